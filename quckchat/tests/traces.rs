//! One client push is one trace: the built servers, with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP/gRPC receiver in this
//! test, export the gateway's span, the service's and the store's, linked
//! parent to child — in one process (all-in-one) and across processes over
//! NATS (gateway + chat-svc + presence-svc).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::UpsertConversationRequest;
use quckchat_proto::push::push_service_client::PushServiceClient;
use quckchat_proto::push::RegisterDeviceRequest;
use quckchat_push::providers::fakes::{FakeFcm, TEST_PROJECT_ID};
use quckchat_runtime::auth::mint_token;
use quckchat_runtime::ephemeral::RedisPool;
use quckchat_runtime::grpc::{client_with_timeouts, AuthChannel, GrpcToken};
use quckchat_runtime::testkit;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

const JWT: &str = "traces-test-jwt-secret-7c1d";
const GRPC_TOKEN: &str = "traces-test-grpc-token-9b2e";
const WAIT: Duration = Duration::from_secs(30);

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let attr = |attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str| {
                attrs
                    .iter()
                    .find(|kv| kv.key == key)
                    .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                    .map(|v| match v {
                        AnyValue::StringValue(s) => s.clone(),
                        other => format!("{other:?}"),
                    })
            };
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    got.push(Got {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: span.trace_id.clone(),
                        span_id: span.span_id.clone(),
                        parent: span.parent_span_id.clone(),
                        attributes: span
                            .attributes
                            .iter()
                            .filter_map(|kv| {
                                Some((kv.key.clone(), attr(&span.attributes, &kv.key)?))
                            })
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on a random port; returns its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router =
            tonic::service::Routes::new(TraceServiceServer::new(self.clone())).into_axum_router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }

    /// Waits for the spans of one `message:send`: the gateway's, chat's and
    /// the store's append, in one trace.
    async fn one_send_trace(&self) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            {
                let got = self.0.lock().unwrap();
                if let Some(chat) = got.iter().find(|s| s.name == "chat.message:send") {
                    let trace: Vec<Got> = got
                        .iter()
                        .filter(|s| s.trace_id == chat.trace_id)
                        .cloned()
                        .collect();
                    let names: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();
                    if names.contains(&"gateway.push") && names.contains(&"store.append_message") {
                        return trace;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no whole message:send trace; spans received: {:#?}",
                self.0
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|s| (&s.service, &s.name))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The common environment of a traced process.
fn traced(cmd: &mut Command, otlp: &str) {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("JWT_SECRET", JWT)
        .env("GRPC_AUTH_TOKEN", GRPC_TOKEN)
        .env("SHUTDOWN_DRAIN_SECS", "1")
        .env("RUST_LOG", "warn")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A binary of the workspace, beside this test's `quckchat`.
fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_quckchat")).with_file_name(name);
    assert!(
        path.exists(),
        "{} not built: cargo build --workspace --bins",
        path.display()
    );
    path
}

async fn wait_ready(port: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /health/ready HTTP/1.0\r\nHost: x\r\n\r\n")
                .await;
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).await.is_ok() && &head[9..12] == b"200" {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An authenticated gRPC channel to `grpc`.
fn channel(grpc: &str) -> AuthChannel {
    client_with_timeouts(
        grpc,
        &GrpcToken::new(GRPC_TOKEN).unwrap(),
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
    .unwrap()
}

/// Creates conversation `c1` of alice and bob over `grpc`'s chat API.
async fn conversation(grpc: &str) {
    ChatServiceClient::new(channel(grpc))
        .upsert_conversation(UpsertConversationRequest {
            conversation_id: "c1".into(),
            member_ids: vec!["alice".into(), "bob".into()],
        })
        .await
        .unwrap();
}

/// alice joins `chat:c1` at `ws_port` and sends one message.
async fn send_one(ws_port: u16) {
    let token = mint_token(JWT, "alice", Duration::from_secs(60));
    let url = format!("ws://127.0.0.1:{ws_port}/socket/websocket?vsn=2.0.0&token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let reply_to = |r: &'static str| {
        let r = r.to_owned();
        move |v: &Value| v[1] == json!(r) && v[3] == "phx_reply"
    };
    ws.send(Message::Text(
        json!(["1", "1", "chat:c1", "phx_join", {}])
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let joined = next_matching(&mut ws, reply_to("1")).await;
    assert_eq!(joined[4]["status"], "ok", "{joined}");
    ws.send(Message::Text(
        json!(["1", "2", "chat:c1", "message:send", {"type": "text", "content": "traced"}])
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let sent = next_matching(&mut ws, reply_to("2")).await;
    assert_eq!(sent[4]["status"], "ok", "{sent}");
}

async fn next_matching<S>(ws: &mut S, want: impl Fn(&Value) -> bool) -> Value
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if want(&v) {
                    return v;
                }
            }
        }
    })
    .await
    .expect("a reply in time")
}

/// The gateway's span is the root; chat's is its child; the store's
/// append is chat's child; attributes name kinds and events, no content.
fn assert_connected(trace: &[Got], gateway_service: &str, chat_service: &str) {
    let find = |name: &str| {
        trace
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} in {trace:#?}"))
    };
    let (gateway, chat, append) = (
        find("gateway.push"),
        find("chat.message:send"),
        find("store.append_message"),
    );
    assert!(
        gateway.parent.is_empty(),
        "the gateway's span is the root: {gateway:?}"
    );
    assert_eq!(
        chat.parent, gateway.span_id,
        "chat's parent is the gateway's span"
    );
    assert_eq!(
        append.parent, chat.span_id,
        "the append's parent is chat's span"
    );
    assert_eq!(gateway.service, gateway_service);
    assert_eq!(chat.service, chat_service);
    assert_eq!(
        gateway.attributes.get("topic.kind").map(String::as_str),
        Some("chat")
    );
    assert_eq!(
        gateway.attributes.get("outcome").map(String::as_str),
        Some("ok")
    );
    assert_eq!(
        chat.attributes.get("event").map(String::as_str),
        Some("message:send")
    );
    for span in trace {
        for value in span.attributes.values() {
            assert!(!value.contains("traced"), "message content in {span:?}");
            assert!(!value.contains("alice"), "a user id in {span:?}");
        }
    }
}

#[tokio::test]
async fn one_send_is_one_trace_in_the_all_in_one_server() {
    let receiver = Receiver::default();
    let otlp = receiver.start().await;
    // bob is offline with an FCM device: the send's push joins its trace.
    let fcm = FakeFcm::start().await.unwrap();
    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quckchat"));
    traced(&mut cmd, &otlp);
    // Log lines written inside a traced operation carry its trace id.
    cmd.env("RUST_LOG", "warn,quckchat_runtime::service=debug")
        .stderr(Stdio::piped());
    cmd.env("PORT", port.to_string())
        .env("DATA_DIR", data.path())
        .env("FIREBASE_SERVICE_ACCOUNT", fcm.service_account_json())
        .env("FIREBASE_PROJECT_ID", TEST_PROJECT_ID)
        .env("FCM_API_URL", fcm.api_url());
    let mut server: Child = cmd.spawn().unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = server.stderr.take().unwrap();
    tokio::spawn({
        let log = log.clone();
        async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().unwrap().push(testkit::strip_ansi(&line));
            }
        }
    });
    wait_ready(port).await;
    let grpc = format!("http://127.0.0.1:{port}");
    conversation(&grpc).await;
    PushServiceClient::new(channel(&grpc))
        .register_device(RegisterDeviceRequest {
            user_id: "bob".into(),
            platform: "fcm".into(),
            token: "bob-phone-token".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    send_one(port).await;
    let trace = receiver.one_send_trace().await;
    assert_connected(&trace, "quckchat", "quckchat");
    let hex: String = trace[0]
        .trace_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !log.lock().unwrap().iter().any(|l| {
        l.contains("command answered")
            && l.contains("message:send")
            && l.contains(&format!("trace_id={hex}"))
    }) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line of the send with trace_id={hex}:\n{}",
            log.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The push: a job span and the provider's, in the same trace.
    let trace_id = trace[0].trace_id.clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    let (job, provider) = loop {
        let got = receiver.0.lock().unwrap().clone();
        let find = |name: &str| {
            got.iter()
                .find(|s| s.name == name && s.trace_id == trace_id)
                .cloned()
        };
        if let (Some(job), Some(provider)) = (find("push.message"), find("push.fcm")) {
            break (job, provider);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no push spans in the send's trace: {:#?}",
            got.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(provider.parent, job.span_id, "push.fcm is the job's child");
    assert_eq!(
        provider.attributes.get("outcome").map(String::as_str),
        Some("sent")
    );
    assert_eq!(fcm.requests().len(), 1, "bob's device pushed once");
}

#[tokio::test]
async fn one_send_is_one_trace_across_gateway_and_chat_svc_over_nats() {
    let (nats, redis) = (testkit::nats_url(), testkit::redis_url());
    let mongodb_url = testkit::mongodb_url();
    let run = testkit::unique("traces");
    let receiver = Receiver::default();
    let otlp = receiver.start().await;
    let (gateway_port, chat_port, presence_port) = (free_port(), free_port(), free_port());
    let common = |cmd: &mut Command, port: u16| {
        traced(cmd, &otlp);
        cmd.env("PORT", port.to_string())
            .env("NATS_URL", &nats)
            .env("NATS_SUBJECT_PREFIX", &run);
    };
    let mut chat = Command::new(binary("chat-svc"));
    common(&mut chat, chat_port);
    chat.env("MONGODB_URL", &mongodb_url).env(
        "PRESENCE_GRPC_URL",
        format!("http://127.0.0.1:{presence_port}"),
    );
    let mut presence = Command::new(binary("presence-svc"));
    common(&mut presence, presence_port);
    presence
        .env("REDIS_URL", &redis)
        .env("REDIS_KEY_PREFIX", &run)
        .env("CHAT_GRPC_URL", format!("http://127.0.0.1:{chat_port}"));
    let mut gateway = Command::new(binary("gateway"));
    common(&mut gateway, gateway_port);
    gateway.env("NODE_NAME", format!("{run}-gw"));
    let _procs: Vec<Child> = vec![
        chat.spawn().unwrap(),
        presence.spawn().unwrap(),
        gateway.spawn().unwrap(),
    ];
    for port in [chat_port, presence_port, gateway_port] {
        wait_ready(port).await;
    }
    conversation(&format!("http://127.0.0.1:{chat_port}")).await;
    send_one(gateway_port).await;
    let trace = receiver.one_send_trace().await;
    assert_connected(&trace, "gateway", "chat-svc");

    // gRPC carries the trace too: the join's presence state, asked of
    // presence-svc, is a child of chat's join span.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = receiver.0.lock().unwrap().clone();
        let joined = got.iter().find(|s| s.name == "chat.phx_join");
        let asked = joined.and_then(|j| {
            got.iter().find(|s| {
                s.service == "presence-svc"
                    && s.name.starts_with("quckchat.presence.v1.PresenceService/")
                    && s.trace_id == j.trace_id
            })
        });
        if let (Some(joined), Some(asked)) = (joined, asked) {
            assert_eq!(asked.parent, joined.span_id, "{asked:?} under {joined:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no presence-svc gRPC span in the join's trace: {:#?}",
            got.iter()
                .map(|s| (&s.service, &s.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Leave nothing behind: the run's database and Redis keys.
    drop(_procs);
    let client = mongodb::Client::with_uri_str(&mongodb_url).await.unwrap();
    client.default_database().unwrap().drop().await.unwrap();
    RedisPool::connect(&redis, &run)
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
}
