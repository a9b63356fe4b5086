//! The all-in-one server end to end over a real socket: a member's message
//! is persisted under DATA_DIR and survives a restart; shutdown closes
//! sockets with 1012; the CLI fails bad configuration with exit code 64.

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
use quckchat_runtime::auth::{mint_token, JwtVerifier};
use quckchat_runtime::config::ConfigReader;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "allinone-test-secret";

fn config(data_dir: &std::path::Path) -> ServeConfig {
    let dir = data_dir.to_str().unwrap();
    let env: HashMap<&str, &str> = HashMap::from([
        ("JWT_SECRET", SECRET),
        ("DATA_DIR", dir),
        ("SHUTDOWN_DRAIN_SECS", "1"),
    ]);
    ServeConfig::read(&mut ConfigReader::new(&env)).unwrap()
}

struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(data_dir: &std::path::Path) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(quckchat::run(config(data_dir), listener, async {
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
/// thread, which must keep serving).
async fn put_conversation(addr: std::net::SocketAddr, id: &str, members: &str) {
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
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_quckchat"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
