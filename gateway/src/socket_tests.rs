//! Socket protocol tests over in-memory pipes and the in-process bus, with a
//! scripted service on `qc.cmd.chat`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::Message;
use futures::channel::mpsc as fmpsc;
use futures::{Sink, Stream, StreamExt};
use prost::Message as _;
use quckchat_proto::bus::{command_reply, ClientCommand, CommandReply, TopicEvent};
use quckchat_runtime::bus::{respond, Bus, MemoryBus, Subjects};
use quckchat_runtime::config::ConfigReader;
use quckchat_runtime::publish::Publisher;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{run, Peer};
use crate::frame::Vsn;
use crate::{Gateway, GatewayConfig, SocketConfig};

/// The server's end of an in-memory WebSocket.
struct Pipe {
    rx: fmpsc::UnboundedReceiver<Message>,
    tx: fmpsc::Sender<Message>,
}

impl Stream for Pipe {
    type Item = Result<Message, crate::ws::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_next_unpin(cx).map(|m| m.map(Ok))
    }
}

impl Sink<Message> for Pipe {
    type Error = fmpsc::SendError;
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tx.poll_ready(cx)
    }
    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.tx.start_send(item)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.tx).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.tx).poll_close(cx)
    }
}

/// The client's end.
struct Client {
    tx: fmpsc::UnboundedSender<Message>,
    rx: fmpsc::Receiver<Message>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    fn send(&self, frame: Value) {
        self.tx
            .unbounded_send(Message::Text(frame.to_string().into()))
            .unwrap();
    }

    fn send_raw(&self, text: &str) {
        self.tx
            .unbounded_send(Message::Text(text.to_owned().into()))
            .unwrap();
    }

    async fn recv(&mut self) -> Value {
        match tokio::time::timeout(Duration::from_secs(3), self.rx.next()).await {
            Ok(Some(Message::Text(t))) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    async fn recv_close(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(Duration::from_secs(3), self.rx.next()).await {
                Ok(Some(Message::Close(Some(c)))) => return c.code,
                Ok(Some(Message::Text(_))) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    async fn quiet(&mut self) -> bool {
        tokio::time::timeout(Duration::from_millis(150), self.rx.next())
            .await
            .is_err()
    }
}

struct Fixture {
    gateway: Gateway,
    bus: Arc<dyn Bus>,
    /// Lets one `hold` push of the scripted service answer.
    release: Arc<tokio::sync::Notify>,
    _service: tokio::task::JoinHandle<()>,
}

fn config(socket: SocketConfig) -> GatewayConfig {
    let mut cfg = config_from_env(&[]);
    cfg.socket = socket;
    cfg
}

/// The gateway's configuration read from these environment variables (and
/// `JWT_SECRET`), as the binary reads it.
fn config_from_env(vars: &[(&'static str, &'static str)]) -> GatewayConfig {
    let mut env: HashMap<&str, &str> = HashMap::from([("JWT_SECRET", "k")]);
    env.extend(vars.iter().copied());
    let mut cfg = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap();
    // Sockets close within 80% of this on shutdown.
    cfg.server.drain = Duration::from_secs(1);
    cfg
}

/// A scripted chat service: joins by anyone but "mallory" (a join of
/// `chat:held` is answered once the test calls `release.notify_one()`); `echo` replies
/// with the payload; `slow` replies after 200 ms; `hold` replies once the
/// test calls `release.notify_one()`; `never` is never answered; `shout`
/// broadcasts the payload to the topic as `shouted`; `close` closes the
/// channel on the sender's connection, then replies.
async fn fixture(socket: SocketConfig) -> Fixture {
    fixture_with(config(socket)).await
}

async fn fixture_with(config: GatewayConfig) -> Fixture {
    fixture_on(config, Arc::new(MemoryBus::new())).await
}

async fn fixture_on(config: GatewayConfig, bus: Arc<dyn Bus>) -> Fixture {
    let release = Arc::new(tokio::sync::Notify::new());
    let service_release = release.clone();
    let subjects = Subjects::new("qc");
    let mut sub = bus
        .subscribe(&subjects.command("chat"), Some("chat"))
        .await
        .unwrap();
    let service_bus = bus.clone();
    let service = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let bus = service_bus.clone();
            let subjects = subjects.clone();
            let release = service_release.clone();
            tokio::spawn(async move {
                let cmd = ClientCommand::decode(msg.payload.as_ref()).unwrap();
                let (ok, response) = match cmd.event.as_str() {
                    "never" => return,
                    "hold" => {
                        release.notified().await;
                        (true, r#"{"held":true}"#.to_owned())
                    }
                    "phx_join" if cmd.topic == "chat:held" => {
                        release.notified().await;
                        (true, r#"{"joined":true}"#.to_owned())
                    }
                    "phx_join" => (
                        cmd.user_id != "mallory",
                        if cmd.user_id == "mallory" {
                            r#"{"reason":"unauthorized"}"#.to_owned()
                        } else if cmd.topic == "chat:fresh" {
                            // A conversation with no message yet.
                            r#"{"lastSeq":0}"#.to_owned()
                        } else {
                            r#"{"joined":true}"#.to_owned()
                        },
                    ),
                    "echo" => (true, String::from_utf8(cmd.payload.clone()).unwrap()),
                    "slow" => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        (true, r#"{"slow":true}"#.to_owned())
                    }
                    "shout" => {
                        let ev = TopicEvent {
                            topic: cmd.topic.clone(),
                            event: "shouted".into(),
                            payload: cmd.payload.clone(),
                            exclude_user_id: String::new(),
                            seq: 0,
                        };
                        bus.publish(
                            &subjects.topic(&cmd.topic),
                            None,
                            Vec::new(),
                            ev.encode_to_vec().into(),
                        )
                        .await
                        .unwrap();
                        (true, "{}".to_owned())
                    }
                    "close" => {
                        Publisher::new(bus.clone(), subjects.clone())
                            .close_connection_channel(
                                &cmd.user_id,
                                &cmd.conn_id,
                                &cmd.topic,
                                "ended",
                            )
                            .await
                            .unwrap();
                        // The close is on its way before the reply.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        (true, r#"{"closing":true}"#.to_owned())
                    }
                    _ => (false, r#"{"reason":"unknown event"}"#.to_owned()),
                };
                let reply = CommandReply {
                    status: if ok {
                        command_reply::Status::Ok
                    } else {
                        command_reply::Status::Error
                    } as i32,
                    response: response.into_bytes(),
                    followups: Vec::new(),
                };
                respond(bus.as_ref(), &msg, reply.encode_to_vec().into())
                    .await
                    .unwrap();
            });
        }
    });
    let gateway = Gateway::new(config, bus.clone(), CancellationToken::new());
    Fixture {
        gateway,
        bus,
        release,
        _service: service,
    }
}

fn connect(f: &Fixture, user: &str, client_buffer: usize) -> Client {
    connect_as(
        f,
        user,
        &uuid::Uuid::new_v4().simple().to_string(),
        client_buffer,
    )
}

fn connect_as(f: &Fixture, user: &str, conn_id: &str, client_buffer: usize) -> Client {
    let (client_tx, server_rx) = fmpsc::unbounded();
    let (server_tx, client_rx) = fmpsc::channel(client_buffer);
    let peer = Peer {
        conn_id: conn_id.into(),
        user_id: user.into(),
        device_id: "d1".into(),
        vsn: Vsn::V2,
    };
    let shared = f.gateway.shared.clone();
    let task = tokio::spawn(run(
        Pipe {
            rx: server_rx,
            tx: server_tx,
        },
        shared,
        peer,
    ));
    Client {
        tx: client_tx,
        rx: client_rx,
        task,
    }
}

async fn join(c: &mut Client, join_ref: &str, topic: &str) -> Value {
    c.send(json!([join_ref, join_ref, topic, "phx_join", {}]));
    c.recv().await
}

#[tokio::test]
async fn heartbeat_join_push_and_join_refs() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    c.send(json!([null, "1", "phoenix", "heartbeat", {}]));
    assert_eq!(
        c.recv().await,
        json!([null, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
    c.send(json!(["9", "2", "chat:c1", "echo", {}]));
    assert_eq!(c.recv().await[4]["response"]["reason"], "unmatched topic");
    assert_eq!(
        join(&mut c, "3", "chat:c1").await,
        json!(["3", "3", "chat:c1", "phx_reply", {"status": "ok", "response": {"joined": true}}])
    );
    c.send(json!(["3", "4", "chat:c1", "echo", {"x": 1}]));
    assert_eq!(
        c.recv().await,
        json!(["3", "4", "chat:c1", "phx_reply", {"status": "ok", "response": {"x": 1}}])
    );
    c.send(json!(["3", "5", "chat:c1", "nope", {}]));
    assert_eq!(c.recv().await[4]["status"], "error");
}

#[tokio::test]
async fn refused_join_leaves_no_channel() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "mallory", 64);
    let reply = join(&mut c, "1", "chat:c1").await;
    assert_eq!(
        reply[4],
        json!({"status": "error", "response": {"reason": "unauthorized"}})
    );
    c.send(json!(["1", "2", "chat:c1", "echo", {}]));
    assert_eq!(c.recv().await[4]["response"]["reason"], "unmatched topic");
    assert_eq!(
        f.gateway.shared.hub.subject_count(),
        1,
        "only the user subject stays subscribed"
    );
}

#[tokio::test]
async fn duplicate_join_closes_the_old_channel_and_leave_closes() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    c.send(json!(["3", "3", "chat:c1", "phx_join", {}]));
    assert_eq!(
        c.recv().await,
        json!(["1", "1", "chat:c1", "phx_close", {}])
    );
    assert_eq!(c.recv().await[4]["status"], "ok");
    c.send(json!(["3", "4", "chat:c1", "phx_leave", {}]));
    assert_eq!(
        c.recv().await,
        json!(["3", "4", "chat:c1", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        c.recv().await,
        json!(["3", "3", "chat:c1", "phx_close", {}])
    );
}

#[tokio::test]
async fn pushes_on_one_channel_are_answered_in_order() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    c.send(json!(["1", "2", "chat:c1", "slow", {}]));
    c.send(json!(["1", "3", "chat:c1", "echo", {}]));
    assert_eq!(c.recv().await[1], "2");
    assert_eq!(c.recv().await[1], "3");
}

#[tokio::test]
async fn one_bus_subscription_per_topic_shared_by_local_sockets() {
    let f = fixture(SocketConfig::default()).await;
    let mut a = connect(&f, "alice", 64);
    let mut b = connect(&f, "bob", 64);
    join(&mut a, "1", "chat:c1").await;
    join(&mut b, "1", "chat:c1").await;
    // Two user subjects plus one topic subject.
    assert_eq!(f.gateway.shared.hub.subject_count(), 3);
    a.send(json!(["1", "2", "chat:c1", "shout", {"hi": true}]));
    let expected = json!([null, null, "chat:c1", "shouted", {"hi": true}]);
    let mut got_a = [a.recv().await, a.recv().await];
    got_a.sort_by_key(|v| v[3].to_string());
    assert_eq!(got_a[1], expected);
    assert_eq!(b.recv().await, expected);
    b.send(json!(["1", "3", "chat:c1", "phx_leave", {}]));
    b.recv().await;
    b.recv().await;
    assert_eq!(
        f.gateway.shared.hub.subject_count(),
        3,
        "still joined by alice"
    );
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        f.gateway.shared.hub.subject_count(),
        1,
        "only bob's user subject remains"
    );
    // With nobody joined, the topic subject has no subscriber on the bus.
    let subject = Subjects::new("qc").topic("chat:c1");
    let err = f
        .bus
        .request(
            &subject,
            Vec::new(),
            bytes::Bytes::new(),
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        quckchat_runtime::bus::BusError::NoResponders(_)
    ));
}

#[tokio::test]
async fn rate_limit_answers_every_push() {
    let f = fixture(SocketConfig {
        rate_per_sec: 5,
        ..SocketConfig::default()
    })
    .await;
    let mut c = connect(&f, "alice", 64);
    for i in 0..15 {
        c.send(json!([null, i.to_string(), "chat:zz", "echo", {}]));
    }
    let mut limited = 0;
    for _ in 0..15 {
        let reply = c.recv().await;
        assert_eq!(reply[3], "phx_reply");
        if reply[4]["response"]["reason"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(
        (4..=6).contains(&limited),
        "burst of 10 allowed, then limited: {limited}"
    );
    assert!(c.quiet().await, "exactly one reply per push");
}

#[tokio::test]
async fn persistent_garbage_closes_with_policy_violation() {
    let f = fixture(SocketConfig {
        malformed_limit: 3,
        ..SocketConfig::default()
    })
    .await;
    let mut c = connect(&f, "alice", 64);
    for _ in 0..3 {
        c.send_raw("not json");
    }
    c.send(json!([null, "1", "phoenix", "heartbeat", {}]));
    assert_eq!(
        c.recv().await[4]["status"],
        "ok",
        "the socket survives a few bad frames"
    );
    c.send_raw("{\"still\": \"not a frame\"}");
    assert_eq!(c.recv_close().await, 1008);
}

#[tokio::test]
async fn oversized_frame_gets_an_error_reply() {
    let f = fixture(SocketConfig {
        max_frame_bytes: 100,
        ..SocketConfig::default()
    })
    .await;
    let mut c = connect(&f, "alice", 64);
    c.send(json!([null, "1", "phoenix", "heartbeat", {"pad": "x".repeat(200)}]));
    let reply = c.recv().await;
    assert_eq!(
        reply[4]["response"],
        json!({"reason": "payload too large", "limit": 100})
    );
}

#[tokio::test]
async fn idle_socket_is_closed() {
    let f = fixture(SocketConfig {
        idle_timeout: Duration::from_millis(300),
        ..SocketConfig::default()
    })
    .await;
    let mut c = connect(&f, "alice", 64);
    assert_eq!(c.recv_close().await, 1000);
}

#[tokio::test]
async fn frames_keep_a_socket_open_and_silence_closes_it_after_the_idle_timeout() {
    let timeout = Duration::from_millis(400);
    let f = fixture(SocketConfig {
        idle_timeout: timeout,
        ..SocketConfig::default()
    })
    .await;
    let mut c = connect(&f, "alice", 64);
    // Heartbeats for three timeouts: each resets it.
    for i in 0..8 {
        c.send(json!([null, i.to_string(), "phoenix", "heartbeat", {}]));
        assert_eq!(c.recv().await[3], "phx_reply");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let silent = std::time::Instant::now();
    assert_eq!(c.recv_close().await, 1000);
    let took = silent.elapsed();
    // Swept every quarter of the timeout: closed between 1 and 1¼ timeouts
    // after the last frame (the last sleep counts; slack for a busy box).
    assert!(
        took + Duration::from_millis(150) >= timeout && took <= timeout * 3,
        "closed {took:?} after the last frame (timeout {timeout:?})"
    );
}

#[tokio::test]
async fn a_socket_opened_after_shutdown_began_is_drained_too() {
    let f = fixture(SocketConfig::default()).await;
    f.gateway.shared.shutdown.cancel();
    // The sweep's last pass is over before this socket enters the table.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = connect(&f, "alice", 64);
    assert_eq!(c.recv_close().await, 1012);
}

#[tokio::test]
async fn slow_consumer_is_dropped_without_blocking_others() {
    let socket = SocketConfig {
        outbound_queue: 8,
        write_timeout: Duration::from_millis(300),
        ..SocketConfig::default()
    };
    let f = fixture(socket).await;
    let mut fast = connect(&f, "alice", 1024);
    let mut stuck = connect(&f, "bob", 0);
    join(&mut fast, "1", "chat:c1").await;
    join(&mut stuck, "1", "chat:c1").await;
    // bob stops reading; alice's shouts keep flowing to alice.
    for i in 0..40 {
        fast.send(json!(["1", i.to_string(), "chat:c1", "shout", {"n": i}]));
        fast.recv().await;
        fast.recv().await;
    }
    let stuck_task = stuck.task;
    tokio::time::timeout(Duration::from_secs(3), stuck_task)
        .await
        .expect("the slow socket is closed within the write timeout")
        .unwrap();
    assert!(!fast.task.is_finished());
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1012() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    f.gateway.shared.shutdown.cancel();
    assert_eq!(c.recv_close().await, 1012);
}

#[tokio::test]
async fn a_push_in_flight_at_shutdown_is_answered_before_the_1012() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    c.send(json!(["1", "2", "chat:c1", "hold", {}]));
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.gateway.shared.shutdown.cancel();
    // Past the latest close time of a socket (80% of the 1 s window), the
    // push still in flight keeps this one open: its message may be stored.
    tokio::time::sleep(Duration::from_millis(850)).await;
    f.release.notify_one();
    assert_eq!(
        c.recv_within(PROMPTLY).await,
        json!(["1", "2", "chat:c1", "phx_reply", {"status": "ok", "response": {"held": true}}]),
        "the ack comes before the close"
    );
    assert_eq!(c.recv_close().await, 1012);
}

#[tokio::test]
async fn a_push_never_answered_does_not_hold_the_close_past_the_drain_window() {
    let f = fixture_with(config_from_env(&[("REQUEST_TIMEOUT_MS", "600000")])).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    c.send(json!(["1", "2", "chat:c1", "never", {}]));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    f.gateway.shared.shutdown.cancel();
    assert_eq!(c.recv_close().await, 1012);
    let took = started.elapsed();
    assert!(
        took <= Duration::from_millis(1_100),
        "closed {took:?} after shutdown began: within the 1 s drain window"
    );
}

#[tokio::test]
async fn join_left_before_it_completes_leaves_no_subscription_and_is_answered() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    // Both frames are read before the join's bus request runs.
    c.send(json!(["1", "1", "chat:c9", "phx_join", {}]));
    c.send(json!(["1", "2", "chat:c9", "phx_leave", {}]));
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(c.recv().await);
    }
    let join_reply = frames
        .iter()
        .find(|f| f[1] == "1" && f[3] == "phx_reply")
        .expect("the join is answered");
    assert_eq!(
        join_reply[4],
        json!({"status": "error", "response": {"reason": "closed"}})
    );
    assert!(
        frames.iter().any(|f| f[1] == "2" && f[4]["status"] == "ok"),
        "the leave is answered"
    );
    assert!(frames.iter().any(|f| f[3] == "phx_close"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        f.gateway.shared.hub.subject_count(),
        1,
        "only the user subject: the topic's registration is gone"
    );
}

#[tokio::test]
async fn open_sockets_are_reported_again_when_presence_asks() {
    use quckchat_proto::bus::{connection_lifecycle, ConnectionLifecycle};
    let f = fixture(SocketConfig::default()).await;
    let subjects = Subjects::new("qc");
    let mut reports = f
        .bus
        .subscribe(&subjects.connection_lifecycle(), None)
        .await
        .unwrap();
    let _a = connect(&f, "alice", 64);
    let _b = connect(&f, "bob", 64);
    let next_open = |msg: quckchat_runtime::bus::BusMessage| {
        let ev = ConnectionLifecycle::decode(msg.payload.as_ref()).unwrap();
        assert_eq!(ev.kind, connection_lifecycle::Kind::Opened as i32);
        ev.user_id
    };
    let mut first = Vec::new();
    for _ in 0..2 {
        first.push(next_open(
            tokio::time::timeout(Duration::from_secs(2), reports.next())
                .await
                .unwrap()
                .unwrap(),
        ));
    }
    first.sort();
    assert_eq!(first, vec!["alice", "bob"]);
    // The listener subscribes in the background: ask until it answers.
    let resync = subjects.gateway_resync(&f.gateway.shared.config.server.node_name);
    let mut again = Vec::new();
    for _ in 0..50 {
        f.bus
            .publish(&resync, None, Vec::new(), bytes::Bytes::new())
            .await
            .unwrap();
        if let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_millis(100), reports.next()).await
        {
            again.push(next_open(msg));
            again.push(next_open(
                tokio::time::timeout(Duration::from_secs(2), reports.next())
                    .await
                    .unwrap()
                    .unwrap(),
            ));
            break;
        }
    }
    again.sort();
    assert_eq!(
        again,
        vec!["alice", "bob"],
        "both open sockets reported again"
    );
}

#[tokio::test]
async fn presence_audits_are_answered_with_the_closed_connections() {
    use quckchat_proto::bus::{ConnectionAudit, ConnectionLifecycle};
    let f = fixture(SocketConfig::default()).await;
    let subjects = Subjects::new("qc");
    let mut reports = f
        .bus
        .subscribe(&subjects.connection_lifecycle(), None)
        .await
        .unwrap();
    let _a = connect(&f, "alice", 64);
    let open = tokio::time::timeout(Duration::from_secs(2), reports.next())
        .await
        .unwrap()
        .unwrap();
    let alice = ConnectionLifecycle::decode(open.payload.as_ref())
        .unwrap()
        .conn_id;
    let audit = subjects.gateway_audit(&f.gateway.shared.config.server.node_name);
    let ask = ConnectionAudit {
        conn_ids: vec![alice.clone(), "gone1".into(), "gone2".into()],
    };
    // The listener subscribes in the background: ask until it answers.
    let mut answer = None;
    for _ in 0..50 {
        let reply = f
            .bus
            .request(
                &audit,
                Vec::new(),
                ask.encode_to_vec().into(),
                Duration::from_millis(100),
            )
            .await;
        if let Ok(msg) = reply {
            answer = Some(ConnectionAudit::decode(msg.payload.as_ref()).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        answer.expect("the audit is answered").conn_ids,
        vec!["gone1", "gone2"],
        "alice's socket is open; the others are not"
    );
}

#[tokio::test]
async fn a_channel_closed_by_its_service_mid_push_answers_the_push_first() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    c.send(json!(["1", "2", "chat:c1", "close", {}]));
    assert_eq!(
        c.recv().await,
        json!(["1", "2", "chat:c1", "phx_reply", {"status": "ok", "response": {"closing": true}}]),
        "the reply comes before the close"
    );
    assert_eq!(
        c.recv().await,
        json!(["1", "1", "chat:c1", "phx_close", {}])
    );
    c.send(json!(["1", "3", "chat:c1", "echo", {}]));
    assert_eq!(
        c.recv().await[4],
        json!({"status": "error", "response": {"reason": "unmatched topic"}})
    );
}

impl Client {
    fn send_binary(&self, data: Vec<u8>) {
        self.tx
            .unbounded_send(Message::Binary(data.into()))
            .unwrap();
    }

    /// The next text frame, waiting at most `within`.
    async fn recv_within(&mut self, within: Duration) -> Value {
        match tokio::time::timeout(within, self.rx.next()).await {
            Ok(Some(Message::Text(t))) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("expected a text frame within {within:?}, got {other:?}"),
        }
    }

    /// Reads text frames until a close frame; fails past `within`.
    async fn frames_until_close(&mut self, within: Duration) -> (Vec<Value>, u16) {
        let deadline = tokio::time::Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.next()).await {
                Ok(Some(Message::Text(t))) => {
                    frames.push(serde_json::from_str(t.as_str()).unwrap())
                }
                Ok(Some(Message::Close(Some(c)))) => return (frames, c.code),
                other => panic!(
                    "expected a close frame within {within:?} (after {} frames), got {other:?}",
                    frames.len()
                ),
            }
        }
    }
}

/// Publishes a topic event as a service would.
async fn broadcast(f: &Fixture, topic: &str, event: &str, payload: Value) {
    publish_topic_event(f, topic, event, payload, 0).await;
}

/// Publishes a topic event with its place `seq` in the topic's sequence (0:
/// not sequenced).
async fn publish_topic_event(f: &Fixture, topic: &str, event: &str, payload: Value, seq: u64) {
    let ev = TopicEvent {
        topic: topic.into(),
        event: event.into(),
        payload: payload.to_string().into_bytes(),
        exclude_user_id: String::new(),
        seq,
    };
    f.bus
        .publish(
            &Subjects::new("qc").topic(topic),
            None,
            Vec::new(),
            ev.encode_to_vec().into(),
        )
        .await
        .unwrap();
}

/// A generous bound for anything that should happen at once, on a loaded
/// machine.
const PROMPTLY: Duration = Duration::from_secs(10);

#[tokio::test]
async fn outbound_queue_overflow_alone_closes_a_slow_consumer_with_1013() {
    // The write timeout is far beyond the test: only the full queue
    // (SOCKET_OUTBOUND_QUEUE) can end bob's socket.
    let cfg = config_from_env(&[
        ("SOCKET_OUTBOUND_QUEUE", "8"),
        ("SOCKET_WRITE_TIMEOUT_SECS", "600"),
    ]);
    assert_eq!(cfg.socket.outbound_queue, 8);
    assert_eq!(cfg.socket.write_timeout, Duration::from_secs(600));
    let f = fixture_with(cfg).await;
    let mut watcher = connect(&f, "alice", 1024);
    // bob's pipe holds one frame: his socket's writes block until he reads.
    let mut bob = connect(&f, "bob", 0);
    join(&mut watcher, "1", "chat:c1").await;
    join(&mut bob, "1", "chat:c1").await;
    const N: u64 = 40;
    // One at a time, each read by alice before the next: she keeps up. Once
    // she has the last, every fan-out is done, and bob's queue (8 frames)
    // overflowed long before, his socket being stuck writing.
    for n in 0..N {
        broadcast(&f, "chat:c1", "tick", json!({ "n": n })).await;
        assert_eq!(watcher.recv_within(PROMPTLY).await[4]["n"], n);
    }
    // bob reads again: what had been queued, then the slow-consumer close.
    let (frames, code) = bob.frames_until_close(PROMPTLY).await;
    assert_eq!(code, 1013, "closed as a slow consumer (try again later)");
    assert!(
        (frames.len() as u64) < N,
        "the overflowing frames were not delivered: {}",
        frames.len()
    );
    assert!(frames.iter().all(|f| f[3] == "tick"));
    assert!(!watcher.task.is_finished(), "alice keeps her socket");
}

#[tokio::test]
async fn deliveries_held_past_the_queue_bound_during_a_join_close_with_1013() {
    let cfg = config_from_env(&[("SOCKET_OUTBOUND_QUEUE", "8")]);
    let f = fixture_with(cfg).await;
    let mut bob = connect(&f, "bob", 1024);
    // The join goes unanswered: the channel's deliveries are held for the
    // reply, up to the queue's bound.
    bob.send(json!(["1", "1", "chat:held", "phx_join", {}]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Spaced so that each leaves the queue before the next: only what the
    // channel holds can pass the bound.
    for n in 0..20 {
        broadcast(&f, "chat:held", "tick", json!({ "n": n })).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (frames, code) = bob.frames_until_close(PROMPTLY).await;
    assert_eq!(code, 1013, "closed as a slow consumer (try again later)");
    assert!(frames.is_empty(), "nothing held was written: {frames:?}");
    f.release.notify_one();
}

#[tokio::test]
async fn a_service_that_never_answers_gets_timeout_after_request_timeout_ms() {
    let cfg = config_from_env(&[("REQUEST_TIMEOUT_MS", "300")]);
    assert_eq!(cfg.bus.request_timeout, Duration::from_millis(300));
    let f = fixture_with(cfg).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    let started = std::time::Instant::now();
    c.send(json!(["1", "2", "chat:c1", "never", {}]));
    assert_eq!(
        c.recv_within(PROMPTLY).await,
        json!(["1", "2", "chat:c1", "phx_reply", {"status": "error", "response": {"reason": "timeout"}}])
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "not before the timeout: {waited:?}"
    );
    // Far below the 5 s default: REQUEST_TIMEOUT_MS was applied.
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    // The channel is free again.
    c.send(json!(["1", "3", "chat:c1", "echo", {"after": true}]));
    assert_eq!(
        c.recv_within(PROMPTLY).await[4],
        json!({"status": "ok", "response": {"after": true}})
    );
}

#[tokio::test]
async fn topics_of_a_service_nobody_runs_answer_service_unavailable() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    for (i, topic) in ["webrtc:lobby", "huddle:h1"].into_iter().enumerate() {
        let r = (i + 1).to_string();
        c.send(json!([r, r, topic, "phx_join", {}]));
        assert_eq!(
            c.recv_within(PROMPTLY).await,
            json!([r, r, topic, "phx_reply", {"status": "error", "response": {"reason": "service unavailable"}}])
        );
    }
    // The refused joins left no channel behind.
    c.send(json!(["1", "9", "webrtc:lobby", "offer", {}]));
    assert_eq!(
        c.recv_within(PROMPTLY).await[4]["response"]["reason"],
        "unmatched topic"
    );
}

#[tokio::test]
async fn binary_push_gets_binary_payloads_are_not_supported() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    // Phoenix's binary push: kind 0, four lengths, the strings, the payload.
    let (join_ref, ref_, topic, event) = ("1", "2", "chat:c1", "upload");
    let mut data = vec![0u8];
    for s in [join_ref, ref_, topic, event] {
        data.push(u8::try_from(s.len()).unwrap());
    }
    for s in [join_ref, ref_, topic, event] {
        data.extend_from_slice(s.as_bytes());
    }
    data.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    c.send_binary(data);
    assert_eq!(
        c.recv_within(PROMPTLY).await,
        json!(["1", "2", "chat:c1", "phx_reply",
            {"status": "error", "response": {"reason": "binary payloads are not supported"}}])
    );
    // The socket and channel carry on.
    c.send(json!(["1", "3", "chat:c1", "echo", {"still": "here"}]));
    assert_eq!(
        c.recv_within(PROMPTLY).await[4]["response"]["still"],
        "here"
    );
}

#[tokio::test]
async fn joins_past_socket_max_channels_get_too_many_channels() {
    let cfg = config_from_env(&[("SOCKET_MAX_CHANNELS", "2")]);
    assert_eq!(cfg.socket.max_channels, 2);
    let f = fixture_with(cfg).await;
    let mut c = connect(&f, "alice", 64);
    assert_eq!(join(&mut c, "1", "chat:c1").await[4]["status"], "ok");
    assert_eq!(join(&mut c, "2", "chat:c2").await[4]["status"], "ok");
    assert_eq!(
        join(&mut c, "3", "chat:c3").await,
        json!(["3", "3", "chat:c3", "phx_reply", {"status": "error", "response": {"reason": "too many channels"}}])
    );
    c.send(json!(["3", "4", "chat:c3", "echo", {}]));
    assert_eq!(
        c.recv_within(PROMPTLY).await[4]["response"]["reason"],
        "unmatched topic",
        "the refused join opened no channel"
    );
    // Leaving one makes room.
    c.send(json!(["2", "5", "chat:c2", "phx_leave", {}]));
    c.recv_within(PROMPTLY).await;
    c.recv_within(PROMPTLY).await;
    assert_eq!(join(&mut c, "6", "chat:c3").await[4]["status"], "ok");
}

#[tokio::test]
async fn a_slow_reply_on_one_channel_does_not_hold_up_another() {
    // c1's push must not time out while c2's is answered, however slow.
    let f = fixture_with(config_from_env(&[("REQUEST_TIMEOUT_MS", "600000")])).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    join(&mut c, "2", "chat:c2").await;
    // c1's push is answered only when released, which happens after c2's
    // reply arrives: c2 must not wait for c1.
    c.send(json!(["1", "3", "chat:c1", "hold", {}]));
    c.send(json!(["2", "4", "chat:c2", "echo", {"c2": true}]));
    assert_eq!(
        c.recv_within(PROMPTLY).await,
        json!(["2", "4", "chat:c2", "phx_reply", {"status": "ok", "response": {"c2": true}}]),
        "c2 answered while c1's push is still in flight"
    );
    f.release.notify_one();
    assert_eq!(
        c.recv_within(PROMPTLY).await,
        json!(["1", "3", "chat:c1", "phx_reply", {"status": "ok", "response": {"held": true}}])
    );
}

/// The value of a counter without labels in Prometheus text (0 if absent).
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn unusable_frames_are_counted_in_the_malformed_frames_metric() {
    const METRIC: &str = "quckchat_gateway_malformed_frames_total";
    let metrics = quckchat_runtime::admin::metrics_handle();
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    let before = counter(&metrics.render(), METRIC);
    c.send_raw("not json");
    c.send_raw(r#"{"not": "a frame"}"#);
    c.send_binary(vec![9, 9, 9]);
    // Frames are handled in order: once the heartbeat is answered the three
    // before it have been counted.
    c.send(json!([null, "1", "phoenix", "heartbeat", {}]));
    assert_eq!(c.recv_within(PROMPTLY).await[1], "1");
    let after = counter(&metrics.render(), METRIC);
    // Other tests in this process may count theirs too; ours are at least 3.
    assert!(after >= before + 3.0, "{METRIC}: {before} -> {after}");
}

/// The in-process bus, with the subscriptions made on it recorded, passing
/// itself off as a network bus (the gateway then subscribes each user apart)
/// or not.
struct RecordingBus {
    inner: MemoryBus,
    in_process: bool,
    subscribed: std::sync::Mutex<Vec<String>>,
}

impl RecordingBus {
    fn new(in_process: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryBus::new(),
            in_process,
            subscribed: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn subscriptions_to(&self, prefix: &str) -> Vec<String> {
        let all = self.subscribed.lock().unwrap();
        all.iter()
            .filter(|s| s.starts_with(prefix))
            .cloned()
            .collect()
    }
}

#[async_trait::async_trait]
impl Bus for RecordingBus {
    async fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: quckchat_runtime::bus::Headers,
        payload: bytes::Bytes,
    ) -> Result<(), quckchat_runtime::bus::BusError> {
        self.inner.publish(subject, reply, headers, payload).await
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<quckchat_runtime::bus::Subscription, quckchat_runtime::bus::BusError> {
        self.subscribed.lock().unwrap().push(subject.to_owned());
        self.inner.subscribe(subject, queue_group).await
    }

    async fn request(
        &self,
        subject: &str,
        headers: quckchat_runtime::bus::Headers,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> Result<quckchat_runtime::bus::BusMessage, quckchat_runtime::bus::BusError> {
        self.inner.request(subject, headers, payload, timeout).await
    }

    fn is_connected(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "recording"
    }

    fn in_process(&self) -> bool {
        self.in_process
    }
}

#[tokio::test]
async fn an_in_process_bus_carries_every_user_on_one_subscription() {
    let bus = RecordingBus::new(true);
    let f = fixture_on(config(SocketConfig::default()), bus.clone()).await;
    let mut users = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let mut c = connect(&f, user, 64);
        join(&mut c, "1", "chat:c1").await;
        users.push(c);
    }
    assert_eq!(bus.subscriptions_to("qc.user."), vec!["qc.user.*"]);
    let publisher = Publisher::new(f.bus.clone(), Subjects::new("qc"));
    let to_user = |user: &'static str, event: &'static str| {
        let publisher = publisher.clone();
        async move {
            publisher
                .to_user(user, "chat:c1", event, &json!({}))
                .await
                .unwrap();
        }
    };
    // A user with no socket here: nobody gets it, nothing breaks.
    to_user("dave", "for:dave").await;
    to_user("bob", "for:bob").await;
    to_user("alice", "for:alice").await;
    assert_eq!(users[1].recv().await[3], "for:bob");
    assert_eq!(users[0].recv().await[3], "for:alice", "alice got another's");
    // bob leaves and comes back: his new socket is served too.
    drop(users.remove(1));
    let mut bob = connect(&f, "bob", 64);
    join(&mut bob, "1", "chat:c1").await;
    to_user("bob", "again").await;
    assert_eq!(bob.recv().await[3], "again");
    assert_eq!(bus.subscriptions_to("qc.user."), vec!["qc.user.*"]);
    to_user("carol", "last").await;
    assert_eq!(users[1].recv().await[3], "last", "carol got another's");
}

#[tokio::test]
async fn a_connection_event_reaches_only_that_connection_of_the_user() {
    connection_events(fixture(SocketConfig::default()).await).await;
}

/// A network bus (NATS) routes each user subject on its own: the node
/// subscribes every connected user apart, and the same events arrive.
#[tokio::test]
async fn a_connection_event_reaches_only_that_connection_over_a_network_bus() {
    let bus = RecordingBus::new(false);
    connection_events(fixture_on(config(SocketConfig::default()), bus.clone()).await).await;
    assert_eq!(bus.subscriptions_to("qc.user."), vec!["qc.user.alice"]);
}

async fn connection_events(f: Fixture) {
    let mut phone = connect_as(&f, "alice", "phone-conn", 64);
    let mut laptop = connect_as(&f, "alice", "laptop-conn", 64);
    join(&mut phone, "1", "chat:c1").await;
    join(&mut laptop, "1", "chat:c1").await;
    let publisher = quckchat_runtime::publish::Publisher::new(f.bus.clone(), Subjects::new("qc"));
    publisher
        .to_connection(
            "alice",
            "laptop-conn",
            "chat:c1",
            "only:laptop",
            &json!({"n": 1}),
        )
        .await
        .unwrap();
    publisher
        .to_user("alice", "chat:c1", "every:device", &json!({"n": 2}))
        .await
        .unwrap();
    assert_eq!(laptop.recv().await[3], "only:laptop");
    assert_eq!(laptop.recv().await[3], "every:device");
    assert_eq!(
        phone.recv().await[3],
        "every:device",
        "the phone got the laptop's event"
    );
    // The user's other devices: not the laptop.
    publisher
        .to_user_except("alice", "laptop-conn", "chat:c1", "not:laptop", &json!({}))
        .await
        .unwrap();
    publisher
        .to_user("alice", "chat:c1", "after", &json!({}))
        .await
        .unwrap();
    assert_eq!(phone.recv().await[3], "not:laptop");
    assert_eq!(phone.recv().await[3], "after");
    assert_eq!(laptop.recv().await[3], "after", "the laptop got not:laptop");
}

#[tokio::test]
async fn a_ping_flood_closes_the_socket_with_policy_violation() {
    const METRIC: &str = "quckchat_gateway_control_limited_total";
    let metrics = quckchat_runtime::admin::metrics_handle();
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    let before = counter(&metrics.render(), METRIC);
    // Far past the burst, sent at once: no refill can keep up.
    let flood = 20 * crate::limits::CONTROL_RATE_PER_SEC;
    for _ in 0..flood {
        c.tx.unbounded_send(Message::Ping(vec![1].into())).unwrap();
    }
    let (_, code) = c.frames_until_close(PROMPTLY).await;
    assert_eq!(code, 1008);
    assert!(counter(&metrics.render(), METRIC) >= before + 1.0);
    tokio::time::timeout(PROMPTLY, c.task)
        .await
        .expect("the socket task ended")
        .unwrap();
}

#[tokio::test]
async fn pongs_and_heartbeats_count_against_the_control_budget_too() {
    let f = fixture(SocketConfig::default()).await;
    let mut pongs = connect(&f, "alice", 64);
    for _ in 0..20 * crate::limits::CONTROL_RATE_PER_SEC {
        pongs
            .tx
            .unbounded_send(Message::Pong(vec![1].into()))
            .unwrap();
    }
    assert_eq!(pongs.frames_until_close(PROMPTLY).await.1, 1008);

    let mut beats = connect(&f, "bob", 1024);
    for i in 0..20 * crate::limits::CONTROL_RATE_PER_SEC {
        beats.send(json!([null, i.to_string(), "phoenix", "heartbeat", {}]));
    }
    let (replies, code) = beats.frames_until_close(PROMPTLY).await;
    assert_eq!(code, 1008);
    assert!(
        replies.len() <= 2 * crate::limits::CONTROL_RATE_PER_SEC as usize + 2,
        "{} heartbeats answered",
        replies.len()
    );
}

#[tokio::test]
async fn heartbeats_at_a_normal_pace_are_answered() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    // A burst a well-behaved client never reaches: all answered.
    for i in 0..crate::limits::CONTROL_RATE_PER_SEC {
        c.tx.unbounded_send(Message::Ping(vec![1].into())).unwrap();
        c.send(json!([null, i.to_string(), "phoenix", "heartbeat", {}]));
        assert_eq!(c.recv().await[1], i.to_string());
    }
}

/// The server's end of a socket whose reads fail.
struct FaultyPipe {
    rx: fmpsc::UnboundedReceiver<Result<Message, crate::ws::Error>>,
    tx: fmpsc::Sender<Message>,
}

impl Stream for FaultyPipe {
    type Item = Result<Message, crate::ws::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_next_unpin(cx)
    }
}

impl Sink<Message> for FaultyPipe {
    type Error = fmpsc::SendError;
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tx.poll_ready(cx)
    }
    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.tx.start_send(item)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.tx).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.tx).poll_close(cx)
    }
}

/// The close code the socket sends after this read error, if any.
async fn close_after_read_error(err: crate::ws::Error) -> Option<u16> {
    let f = fixture(SocketConfig::default()).await;
    let (client_tx, server_rx) = fmpsc::unbounded();
    let (server_tx, mut client_rx) = fmpsc::channel(64);
    let peer = Peer {
        conn_id: "c".into(),
        user_id: "alice".into(),
        device_id: "d1".into(),
        vsn: Vsn::V2,
    };
    let task = tokio::spawn(run(
        FaultyPipe {
            rx: server_rx,
            tx: server_tx,
        },
        f.gateway.shared.clone(),
        peer,
    ));
    client_tx
        .unbounded_send(Ok(Message::Text(
            json!([null, "1", "phoenix", "heartbeat", {}])
                .to_string()
                .into(),
        )))
        .unwrap();
    client_tx.unbounded_send(Err(err)).unwrap();
    let mut code = None;
    while let Ok(Some(msg)) = tokio::time::timeout(PROMPTLY, client_rx.next()).await {
        if let Message::Close(frame) = msg {
            code = frame.map(|c| c.code);
            break;
        }
    }
    drop(client_tx);
    tokio::time::timeout(PROMPTLY, task)
        .await
        .expect("the socket task ended")
        .unwrap();
    code
}

#[tokio::test]
async fn websocket_protocol_errors_close_with_1002_and_bad_utf8_with_1007() {
    use crate::ws::Error;
    assert_eq!(
        close_after_read_error(Error::Protocol("reserved bits set")).await,
        Some(1002)
    );
    assert_eq!(close_after_read_error(Error::Utf8).await, Some(1007));
    assert_eq!(
        close_after_read_error(Error::TooBig { limit: 1 }).await,
        Some(1009)
    );
    // The peer went away: nobody to send a close frame to.
    assert_eq!(close_after_read_error(Error::Reset).await, None);
    let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    assert_eq!(close_after_read_error(Error::Io(io)).await, None);
}

#[tokio::test]
async fn socket_control_rate_per_sec_sets_the_control_budget() {
    // A budget of 1/s (burst 2): the third heartbeat at once closes the
    // socket; with the default (20/s) the same three are answered.
    let f = fixture_with(config_from_env(&[("SOCKET_CONTROL_RATE_PER_SEC", "1")])).await;
    let mut c = connect(&f, "alice", 64);
    for i in 0..3 {
        c.send(json!([null, i.to_string(), "phoenix", "heartbeat", {}]));
    }
    let (_, code) = c.frames_until_close(PROMPTLY).await;
    assert_eq!(code, 1008);
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    for i in 0..3 {
        c.send(json!([null, i.to_string(), "phoenix", "heartbeat", {}]));
        assert_eq!(c.recv().await[3], "phx_reply");
    }
}

#[tokio::test]
async fn socket_malformed_limit_sets_the_strikes_before_1008() {
    let f = fixture_with(config_from_env(&[("SOCKET_MALFORMED_LIMIT", "2")])).await;
    let mut c = connect(&f, "alice", 64);
    for _ in 0..3 {
        c.send_raw("not a frame");
    }
    let (_, code) = c.frames_until_close(PROMPTLY).await;
    assert_eq!(code, 1008, "the third unusable frame is over a limit of 2");
}

/// Publishes chat's `message:new` with its seq, as chat-svc does.
async fn broadcast_seq(f: &Fixture, topic: &str, seq: u64) {
    let payload = json!({"message": {"seq": seq}});
    publish_topic_event(f, topic, "message:new", payload, seq).await;
}

/// Answers gateways that missed `message:new` events as chat does, after
/// `delay`; returns the requests seen, `(topic, after, before)`.
async fn answer_missed(
    f: &Fixture,
    delay: Duration,
) -> Arc<std::sync::Mutex<Vec<(String, u64, u64)>>> {
    use quckchat_proto::bus::{MissedEvents, MissedRequest, SequencedEvent};
    let mut asked = f
        .bus
        .subscribe(
            &Subjects::new("qc").service_event("chat", "missed"),
            Some("chat"),
        )
        .await
        .unwrap();
    let bus = f.bus.clone();
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Some(msg) = asked.next().await {
            let req = MissedRequest::decode(msg.payload.as_ref()).unwrap();
            seen.lock()
                .unwrap()
                .push((req.topic.clone(), req.after_seq, req.before_seq));
            let events = (req.after_seq + 1..req.before_seq)
                .map(|seq| SequencedEvent {
                    seq,
                    event: "message:new".into(),
                    payload: json!({"message": {"seq": seq, "filled": true}})
                        .to_string()
                        .into_bytes(),
                })
                .collect();
            let reply = MissedEvents { events }.encode_to_vec();
            tokio::time::sleep(delay).await;
            quckchat_runtime::bus::respond(bus.as_ref(), &msg, reply.into())
                .await
                .unwrap();
        }
    });
    requests
}

#[tokio::test]
async fn a_lost_broadcast_is_fetched_before_the_next_one_is_delivered() {
    let f = fixture(SocketConfig::default()).await;
    let requests = answer_missed(&f, Duration::ZERO).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    for seq in [1, 2, 5, 5, 6] {
        broadcast_seq(&f, "chat:c1", seq).await;
    }
    let mut got = Vec::new();
    for _ in 0..7 {
        let frame = c.recv_within(PROMPTLY).await;
        assert_eq!(frame[3], "message:new", "{frame}");
        got.push((
            frame[4]["message"]["seq"].as_u64().unwrap(),
            frame[4]["message"]["filled"] == true,
        ));
    }
    assert_eq!(
        got,
        [
            (1, false),
            (2, false),
            (3, true),
            (4, true),
            (5, false),
            // A retried send published again: delivered, clients dedupe by id.
            (5, false),
            (6, false),
        ]
    );
    assert_eq!(*requests.lock().unwrap(), [("chat:c1".to_owned(), 2, 5)]);

    // A join reply's lastSeq says where the sequence stands: seq 1 of a new
    // conversation lost before this node saw any event is filled too.
    let mut d = connect(&f, "bob", 64);
    join(&mut d, "1", "chat:fresh").await;
    broadcast_seq(&f, "chat:fresh", 2).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let frame = d.recv_within(PROMPTLY).await;
        got.push(frame[4]["message"]["seq"].as_u64().unwrap());
    }
    assert_eq!(got, [1, 2]);
    assert_eq!(
        requests.lock().unwrap().last().unwrap(),
        &("chat:fresh".to_owned(), 0, 2)
    );
}

/// Events that come while a gap is being filled wait for it, in order, and
/// a gap among them is filled too.
#[tokio::test]
async fn events_during_a_fill_wait_for_it_and_their_own_gaps_are_filled() {
    let f = fixture(SocketConfig::default()).await;
    let requests = answer_missed(&f, Duration::from_millis(200)).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    broadcast_seq(&f, "chat:c1", 1).await;
    assert_eq!(c.recv_within(PROMPTLY).await[4]["message"]["seq"], 1);
    // 3 opens a fill that takes 200 ms; 4, 6 and 7 come meanwhile.
    for seq in [3, 4, 6, 7] {
        broadcast_seq(&f, "chat:c1", seq).await;
    }
    let mut got = Vec::new();
    for _ in 0..6 {
        let frame = c.recv_within(PROMPTLY).await;
        got.push(frame[4]["message"]["seq"].as_u64().unwrap());
    }
    assert_eq!(got, [2, 3, 4, 5, 6, 7]);
    assert_eq!(
        *requests.lock().unwrap(),
        [("chat:c1".to_owned(), 1, 3), ("chat:c1".to_owned(), 4, 6)]
    );
    // Past the fills, events go out at once again.
    broadcast_seq(&f, "chat:c1", 8).await;
    assert_eq!(c.recv_within(PROMPTLY).await[4]["message"]["seq"], 8);
}

/// A room with more sockets here than the bus's caller delivers to itself
/// gets its events from a task: every socket, in order, gaps filled.
#[tokio::test]
async fn a_big_rooms_events_reach_every_socket_in_order() {
    let f = fixture(SocketConfig::default()).await;
    let requests = answer_missed(&f, Duration::from_millis(50)).await;
    let mut clients = Vec::new();
    for n in 0..crate::hub::DELIVER_INLINE_MAX + 6 {
        let mut c = connect(&f, &format!("u{n}"), 256);
        join(&mut c, "1", "chat:big").await;
        clients.push(c);
    }
    // 10 is missed; the rest are published back to back.
    for seq in (1..=40).filter(|&s| s != 10) {
        broadcast_seq(&f, "chat:big", seq).await;
    }
    for c in &mut clients {
        let mut got = Vec::new();
        for _ in 0..40 {
            let frame = c.recv_within(PROMPTLY).await;
            got.push(frame[4]["message"]["seq"].as_u64().unwrap());
        }
        assert_eq!(got, (1..=40).collect::<Vec<_>>());
    }
    assert_eq!(*requests.lock().unwrap(), [("chat:big".to_owned(), 9, 11)]);
}

#[tokio::test]
async fn a_gap_nobody_can_fill_delays_the_next_event_at_most_the_fill_timeout() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    join(&mut c, "1", "chat:c1").await;
    broadcast_seq(&f, "chat:c1", 1).await;
    assert_eq!(c.recv_within(PROMPTLY).await[4]["message"]["seq"], 1);
    let started = std::time::Instant::now();
    // Nobody answers on the missed subject.
    broadcast_seq(&f, "chat:c1", 3).await;
    assert_eq!(c.recv_within(PROMPTLY).await[4]["message"]["seq"], 3);
    assert!(
        started.elapsed() < crate::hub::GAP_FILL_TIMEOUT + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_command_nobody_listens_for_is_tried_once_more_after_a_pause() {
    let f = fixture(SocketConfig::default()).await;
    let mut c = connect(&f, "alice", 64);
    // The huddle service subscribes 100 ms after the first attempt found no
    // one (as a service does re-subscribing after a bus reconnect).
    let bus = f.bus.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut sub = bus
            .subscribe(&Subjects::new("qc").command("huddle"), Some("huddle"))
            .await
            .unwrap();
        let msg = sub.next().await.unwrap();
        let reply = quckchat_proto::bus::CommandReply {
            status: quckchat_proto::bus::command_reply::Status::Ok as i32,
            response: br#"{"late":true}"#.to_vec(),
            followups: Vec::new(),
        };
        quckchat_runtime::bus::respond(bus.as_ref(), &msg, reply.encode_to_vec().into())
            .await
            .unwrap();
    });
    c.send(json!(["1", "1", "huddle:h1", "phx_join", {}]));
    let reply = c.recv_within(PROMPTLY).await;
    assert_eq!(
        reply,
        json!(["1", "1", "huddle:h1", "phx_reply", {"status": "ok", "response": {"late": true}}])
    );
    late.await.unwrap();
}
