//! The all-in-one server end to end over a real socket: a member's message
//! is persisted under DATA_DIR and survives a restart; shutdown closes
//! sockets with 1012; the CLI fails bad configuration with exit code 64;
//! gRPC answers only callers presenting `GRPC_AUTH_TOKEN`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use quckchat::ServeConfig;
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::{
    GetConversationRequest, GetHistoryRequest, PostMessageRequest, UpsertConversationRequest,
};
use quckchat_runtime::auth::{mint_token, JwtVerifier};
use quckchat_runtime::config::ConfigReader;
use quckchat_runtime::grpc::GrpcToken;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "allinone-test-secret";
const GRPC_TOKEN: &str = "allinone-grpc-token-0123456789";

fn config(data_dir: &std::path::Path) -> ServeConfig {
    config_with(data_dir, Some(GRPC_TOKEN))
}

fn config_with(data_dir: &std::path::Path, grpc_token: Option<&str>) -> ServeConfig {
    let dir = data_dir.to_str().unwrap();
    let mut env: HashMap<&str, &str> = HashMap::from([
        ("JWT_SECRET", SECRET),
        ("DATA_DIR", dir),
        ("SHUTDOWN_DRAIN_SECS", "1"),
    ]);
    if let Some(token) = grpc_token {
        env.insert("GRPC_AUTH_TOKEN", token);
    }
    ServeConfig::read(&mut ConfigReader::new(&env)).unwrap()
}

struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(data_dir: &std::path::Path) -> Running {
    start_with(config(data_dir)).await
}

async fn start_with(config: ServeConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(quckchat::run(config, listener, async {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: std::net::SocketAddr, user: &str) -> Ws {
    let token = mint_token(SECRET, user, Duration::from_secs(60));
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}");
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The next frame for `event`, skipping presence traffic and other events.
async fn recv_event(ws: &mut Ws, event: &str) -> Value {
    loop {
        let frame = recv(ws).await;
        if frame[3] == event {
            return frame;
        }
    }
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

/// Runs `quckchat conversation put` against the server (off the runtime's
/// thread, which must keep serving), with `GRPC_AUTH_TOKEN` as given.
async fn put_conversation(addr: std::net::SocketAddr, id: &str, members: &str) {
    let out = run_put(addr, id, members, Some(GRPC_TOKEN)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn run_put(
    addr: std::net::SocketAddr,
    id: &str,
    members: &str,
    token: Option<&'static str>,
) -> std::process::Output {
    let args = [
        "conversation",
        "put",
        id,
        "--members",
        members,
        "--addr",
        &format!("http://{addr}"),
    ]
    .map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_quckchat"));
        cmd.args(args).env_remove("GRPC_AUTH_TOKEN");
        if let Some(token) = token {
            cmd.env("GRPC_AUTH_TOKEN", token);
        }
        cmd.output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn message_between_members_persists_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    put_conversation(server.addr, "c1", "alice,bob").await;

    let mut alice = connect(server.addr, "alice").await;
    let mut bob = connect(server.addr, "bob").await;
    let mut eve = connect(server.addr, "eve").await;
    send(&mut eve, json!(["1", "1", "chat:c1", "phx_join", {}])).await;
    let refused = recv_event(&mut eve, "phx_reply").await;
    assert_eq!(refused[4]["response"]["reason"], "unauthorized");
    for ws in [&mut alice, &mut bob] {
        send(ws, json!(["1", "1", "chat:c1", "phx_join", {}])).await;
        let reply = recv_event(ws, "phx_reply").await;
        let joined = json!({"conversationId": "c1", "lastSeq": 0, "readUpTo": 0});
        assert_eq!(reply[4]["response"], joined);
        let state = recv(ws).await;
        assert_eq!(state[3], "presence_state", "presence follows the join");
        assert_eq!(state[0], "1", "with the channel's join_ref");
        assert!(state[4].is_object());
    }
    let text = json!({"type": "text", "content": "hello bob"});
    send(
        &mut alice,
        json!(["1", "2", "chat:c1", "message:send", text]),
    )
    .await;
    let new = recv_event(&mut bob, "message:new").await;
    assert_eq!(new[3], "message:new");
    assert_eq!(new[4]["message"]["content"], "hello bob");
    assert_eq!(new[4]["message"]["senderId"], "alice");
    assert_eq!(new[4]["message"]["seq"], 1);

    // Shutdown drains sockets with 1012 ("service restart").
    server.stop.send(()).unwrap();
    let mut code = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(3), bob.next()).await {
        if let Ok(Message::Close(Some(frame))) = msg {
            code = Some(u16::from(frame.code));
            break;
        }
    }
    assert_eq!(code, Some(1012));
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let server = start(dir.path()).await;
    let mut bob = connect(server.addr, "bob").await;
    send(&mut bob, json!(["1", "1", "chat:c1", "phx_join", {}])).await;
    let reply = recv_event(&mut bob, "phx_reply").await;
    assert_eq!(
        reply[4]["response"]["lastSeq"], 1,
        "the message survived the restart"
    );
    server.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[test]
fn bad_configuration_exits_64_naming_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_quckchat"))
        .env("PORT", "not-a-port")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PORT"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn token_command_mints_a_verifiable_token() {
    let out = Command::new(env!("CARGO_BIN_EXE_quckchat"))
        .args(["token", "u42", "--ttl", "10m"])
        .env("JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let identity = JwtVerifier::hs256(SECRET).verify(token.trim()).unwrap();
    assert_eq!(identity.user_id, "u42");
}

#[test]
fn conversation_put_reports_an_unreachable_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_quckchat"))
        .args([
            "conversation",
            "put",
            "c1",
            "--members",
            "a",
            "--addr",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

fn chat_client(
    addr: std::net::SocketAddr,
    token: Option<&str>,
) -> ChatServiceClient<quckchat_runtime::grpc::AuthChannel> {
    let url = format!("http://{addr}");
    match token {
        Some(t) => ChatServiceClient::new(
            quckchat_runtime::grpc::client(&url, &GrpcToken::new(t).unwrap()).unwrap(),
        ),
        None => ChatServiceClient::with_interceptor(
            tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect_lazy(),
            quckchat_runtime::grpc::Bearer::none(),
        ),
    }
}

/// GetHistory, UpsertConversation and PostMessage on `client`: each one's
/// code (`Ok` for a success).
async fn three_calls(
    client: &mut ChatServiceClient<quckchat_runtime::grpc::AuthChannel>,
) -> [tonic::Code; 3] {
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |()| tonic::Code::Ok);
    let upsert = client
        .upsert_conversation(UpsertConversationRequest {
            conversation_id: "g1".into(),
            member_ids: vec!["mallory".into()],
        })
        .await
        .map(drop);
    let post = client
        .post_message(PostMessageRequest {
            conversation_id: "g1".into(),
            sender_id: "mallory".into(),
            content: "hi".into(),
            ..Default::default()
        })
        .await
        .map(drop);
    let history = client
        .get_history(GetHistoryRequest {
            conversation_id: "g1".into(),
            before_seq: 0,
            limit: 0,
        })
        .await
        .map(drop);
    [code(history), code(upsert), code(post)]
}

#[tokio::test]
async fn grpc_answers_only_callers_with_the_token_and_health_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let unauthenticated = [tonic::Code::Unauthenticated; 3];
    let mut anonymous = chat_client(server.addr, None);
    assert_eq!(three_calls(&mut anonymous).await, unauthenticated);
    let mut wrong = chat_client(server.addr, Some("allinone-grpc-token-0123456780"));
    assert_eq!(three_calls(&mut wrong).await, unauthenticated);
    // A bogus header of another scheme changes nothing either.
    let mut request = tonic::Request::new(GetConversationRequest {
        conversation_id: "g1".into(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Basic {GRPC_TOKEN}").parse().unwrap(),
    );
    let err = anonymous.get_conversation(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // Nothing was created by the refused calls.
    let mut right = chat_client(server.addr, Some(GRPC_TOKEN));
    let err = right
        .get_conversation(GetConversationRequest {
            conversation_id: "g1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "no conversation g1 yet");
    assert_eq!(three_calls(&mut right).await, [tonic::Code::Ok; 3]);
    // Health is plain HTTP, without credentials.
    let health = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(server.addr).unwrap();
        tcp.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    server.stop.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), server.task).await;
}

#[tokio::test]
async fn without_grpc_auth_token_grpc_answers_only_the_server_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(config_with(dir.path(), None)).await;
    let unauthenticated = [tonic::Code::Unauthenticated; 3];
    assert_eq!(
        three_calls(&mut chat_client(server.addr, None)).await,
        unauthenticated
    );
    assert_eq!(
        three_calls(&mut chat_client(server.addr, Some(GRPC_TOKEN))).await,
        unauthenticated
    );
    // The CLI without the token is refused, and says what to set.
    let out = run_put(server.addr, "c1", "alice,bob", None).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Unauthenticated") && stderr.contains("GRPC_AUTH_TOKEN"),
        "{stderr}"
    );
    server.stop.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), server.task).await;
}

#[tokio::test]
async fn the_cli_is_refused_with_a_wrong_token_and_works_with_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let out = run_put(
        server.addr,
        "c1",
        "alice",
        Some("allinone-grpc-token-wrong-000"),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
    let out = run_put(server.addr, "c1", "alice", Some(GRPC_TOKEN)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("c1 members=alice"));
    server.stop.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), server.task).await;
}
