//! chat-svc refuses a dead MongoDB, a missing GRPC_AUTH_TOKEN or an unusable
//! store setting with one clear line, in bounded time; with
//! `CHAT_STORE=embedded` it keeps what it acknowledged across a kill.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::{GetConversationRequest, PostMessageRequest, UpsertConversationRequest};
use quckchat_runtime::grpc::{client, GrpcToken};
use quckchat_runtime::testkit::{self, assert_start_fails, nats_url};

/// Asserts chat-svc refuses to start with `extra` on top of a listen
/// address, NATS and (unless `extra` names it empty) a gRPC token.
fn assert_chat_svc_refuses(extra: &[(&str, &str)], code: i32, names: &str) {
    let nats = nats_url();
    let mut env = vec![
        ("BIND_ADDRESS", "127.0.0.1"),
        ("PORT", "0"),
        ("NATS_URL", nats.as_str()),
        ("GRPC_AUTH_TOKEN", "startup-test-token-0123456789"),
    ];
    env.extend_from_slice(extra);
    assert_start_fails(Path::new(env!("CARGO_BIN_EXE_chat-svc")), &env, code, names);
}

#[test]
fn dead_mongodb_exits_naming_it() {
    assert_chat_svc_refuses(
        &[(
            "MONGODB_URL",
            "mongodb://127.0.0.1:1/x?directConnection=true",
        )],
        1,
        "MONGODB_URL",
    );
}

#[test]
fn missing_grpc_auth_token_exits_64_naming_it() {
    // An empty value is taken for unset.
    assert_chat_svc_refuses(&[("GRPC_AUTH_TOKEN", "")], 64, "GRPC_AUTH_TOKEN");
}

#[test]
fn an_unknown_store_exits_64_naming_it() {
    assert_chat_svc_refuses(&[("CHAT_STORE", "sqlite")], 64, "CHAT_STORE");
}

#[test]
fn an_unusable_data_dir_exits_naming_it() {
    // A directory inside a regular file cannot be created.
    let file = tempfile::NamedTempFile::new().unwrap();
    let data_dir = file.path().join("data");
    assert_chat_svc_refuses(
        &[
            ("CHAT_STORE", "embedded"),
            ("DATA_DIR", data_dir.to_str().unwrap()),
        ],
        1,
        "DATA_DIR",
    );
}

const TOKEN: &str = "embedded-chat-svc-token-0123456789";

fn start_embedded(data_dir: &Path, port: u16, prefix: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chat-svc"))
        .env_clear()
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("NATS_URL", nats_url())
        .env("NATS_SUBJECT_PREFIX", prefix)
        .env("GRPC_AUTH_TOKEN", TOKEN)
        .env("CHAT_STORE", "embedded")
        .env("DATA_DIR", data_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A gRPC client once the process answers (within 20 s).
async fn connected(port: u16) -> ChatServiceClient<quckchat_runtime::grpc::AuthChannel> {
    let token = GrpcToken::new(TOKEN).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c =
            ChatServiceClient::new(client(&format!("http://127.0.0.1:{port}"), &token).unwrap());
        let probe = c
            .get_conversation(GetConversationRequest {
                conversation_id: "probe".into(),
            })
            .await;
        match probe {
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {}
            _ => return c,
        }
        assert!(Instant::now() < deadline, "chat-svc did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_embedded_store_keeps_what_it_acknowledged_across_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = testkit::unique("chatemb");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut first = start_embedded(dir.path(), port, &prefix);
    let mut c = connected(port).await;
    c.upsert_conversation(UpsertConversationRequest {
        conversation_id: "kept".into(),
        member_ids: vec!["alice".into(), "bob".into()],
    })
    .await
    .unwrap();
    for text in ["one", "two"] {
        c.post_message(PostMessageRequest {
            conversation_id: "kept".into(),
            sender_id: "alice".into(),
            r#type: "text".into(),
            content: text.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // SIGKILL: no shutdown, no final checkpoint.
    first.kill().unwrap();
    first.wait().unwrap();

    let mut second = start_embedded(dir.path(), port, &prefix);
    let mut c = connected(port).await;
    let conv = c
        .get_conversation(GetConversationRequest {
            conversation_id: "kept".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut members = conv.member_ids;
    members.sort();
    assert_eq!(members, ["alice", "bob"]);
    assert_eq!(conv.last_seq, 2, "both acknowledged messages survived");
    second.kill().unwrap();
    second.wait().unwrap();
}
