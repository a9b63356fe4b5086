//! chat-svc's gRPC API (`proto/quckchat/chat/v1/chat.proto`) over a real
//! HTTP/2 connection: the embedded store and the in-process bus behind it, so
//! what each call changes is seen where clients see it (topic broadcasts,
//! channel closes, later calls). Served as every process serves it: behind
//! the `GRPC_AUTH_TOKEN` check, the client presenting the token.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use quckchat_chat::grpc::ChatGrpc;
use quckchat_chat::service::ChatService;
use quckchat_chat::store::{ChatStore, EmbeddedStore};
use quckchat_proto::bus::{direct_event, DirectEvent, TopicEvent};
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::{
    GetConversationRequest, GetHistoryRequest, GetUnreadCountsRequest, PostMessageRequest,
    RemoveMemberRequest, UnreadCount, UpsertConversationRequest,
};
use quckchat_runtime::bus::{Bus, MemoryBus, Subjects};
use quckchat_runtime::grpc::{authenticated, AuthChannel, GrpcToken};
use quckchat_runtime::service::answer;
use quckchat_runtime::testkit;
use serde_json::{json, Value};
use tonic::Code;

const PROMPTLY: Duration = Duration::from_secs(10);

const TOKEN: &str = "chat-grpc-test-token-0123456789";

struct Fixture {
    client: ChatServiceClient<AuthChannel>,
    addr: std::net::SocketAddr,
    service: Arc<ChatService>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ChatStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let subjects = Subjects::new("qc");
    let service = Arc::new(ChatService::new(store, bus.clone(), subjects.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = GrpcToken::new(TOKEN).unwrap();
    let routes = authenticated(
        tonic::service::Routes::new(ChatGrpc::server(service.clone())),
        &token,
    );
    let server = tonic::transport::Server::builder().add_routes(routes.into());
    tokio::spawn(server.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    let channel = quckchat_runtime::grpc::client(&format!("http://{addr}"), &token).unwrap();
    let client = ChatServiceClient::new(channel);
    Fixture {
        client,
        addr,
        service,
        bus,
        subjects,
        _dir: dir,
    }
}

impl Fixture {
    async fn upsert(&mut self, id: &str, members: &[&str]) {
        self.client
            .upsert_conversation(UpsertConversationRequest {
                conversation_id: id.into(),
                member_ids: members.iter().map(|m| (*m).to_owned()).collect(),
            })
            .await
            .unwrap();
    }

    async fn post(&mut self, conv: &str, sender: &str, content: &str) -> u64 {
        self.client
            .post_message(PostMessageRequest {
                conversation_id: conv.into(),
                sender_id: sender.into(),
                r#type: "text".into(),
                content: content.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .seq
    }

    /// A client command as the gateway would send it.
    async fn push(&self, user: &str, conv: &str, event: &str, payload: Value) -> (bool, Value) {
        let cmd = testkit::command(&format!("chat:{conv}"), event, user, &payload);
        let reply = testkit::decode(&answer(self.service.as_ref(), cmd).await);
        (reply.ok, reply.response)
    }
}

#[tokio::test]
async fn get_conversation_returns_members_and_last_seq() {
    let mut f = fixture().await;
    let err = f
        .client
        .get_conversation(GetConversationRequest {
            conversation_id: "nosuch".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = f
        .client
        .get_conversation(GetConversationRequest {
            conversation_id: "bad id!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    f.upsert("g1", &["alice", "bob"]).await;
    f.post("g1", "alice", "one").await;
    f.post("g1", "bob", "two").await;
    let conv = f
        .client
        .get_conversation(GetConversationRequest {
            conversation_id: "g1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(conv.conversation_id, "g1");
    let mut members = conv.member_ids.clone();
    members.sort();
    assert_eq!(members, ["alice", "bob"]);
    assert_eq!(conv.last_seq, 2);
}

#[tokio::test]
async fn remove_member_closes_their_channel_and_refuses_their_pushes() {
    let mut f = fixture().await;
    f.upsert("g2", &["alice", "bob"]).await;
    let (ok, r) = f
        .push(
            "bob",
            "g2",
            "message:send",
            json!({"type": "text", "content": "hi"}),
        )
        .await;
    assert!(ok, "{r}");
    let mut bob_events = f
        .bus
        .subscribe(&f.subjects.user("bob"), None)
        .await
        .unwrap();
    let conv = f
        .client
        .remove_member(RemoveMemberRequest {
            conversation_id: "g2".into(),
            user_id: "bob".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(conv.member_ids, ["alice"]);
    assert_eq!(conv.last_seq, 1);
    // bob's gateways are told to close his channel on the conversation.
    let msg = tokio::time::timeout(PROMPTLY, bob_events.next())
        .await
        .expect("a close for bob")
        .unwrap();
    let ev = DirectEvent::decode(msg.payload.as_ref()).unwrap();
    assert_eq!(ev.topic, "chat:g2");
    assert!(
        matches!(ev.kind, Some(direct_event::Kind::Close(_))),
        "{ev:?}"
    );
    // And his pushes are refused at once (no stale membership cache).
    let (ok, r) = f
        .push(
            "bob",
            "g2",
            "message:send",
            json!({"type": "text", "content": "again"}),
        )
        .await;
    assert!(!ok);
    assert_eq!(r["reason"], "unauthorized");
    let (ok, r) = f
        .push(
            "alice",
            "g2",
            "message:send",
            json!({"type": "text", "content": "still"}),
        )
        .await;
    assert!(ok, "{r}");
    let got = f
        .client
        .get_conversation(GetConversationRequest {
            conversation_id: "g2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.member_ids, ["alice"]);
}

#[tokio::test]
async fn post_message_stores_broadcasts_and_is_idempotent() {
    let mut f = fixture().await;
    f.upsert("g3", &["alice", "bot"]).await;
    let mut topic = f
        .bus
        .subscribe(&f.subjects.topic("chat:g3"), None)
        .await
        .unwrap();
    // A bot (a member, like any sender) posts; the type defaults to "system".
    let request = PostMessageRequest {
        conversation_id: "g3".into(),
        sender_id: "bot".into(),
        content: "deploy finished".into(),
        client_message_id: "bot-1".into(),
        metadata_json: r#"{"build": 42}"#.into(),
        ..Default::default()
    };
    let m = f
        .client
        .post_message(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.conversation_id, "g3");
    assert_eq!(m.seq, 1);
    assert_eq!(m.sender_id, "bot");
    assert_eq!(m.r#type, "system");
    assert_eq!(m.content, "deploy finished");
    assert_eq!(m.client_message_id, "bot-1");
    assert_eq!(
        serde_json::from_str::<Value>(&m.metadata_json).unwrap(),
        json!({"build": 42})
    );
    assert!(!m.id.is_empty() && !m.created_at.is_empty());
    assert!(m.edited_at.is_empty() && m.deleted_at.is_empty());
    // Delivered like any other message.
    let msg = tokio::time::timeout(PROMPTLY, topic.next())
        .await
        .expect("message:new on the topic")
        .unwrap();
    let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
    assert_eq!(ev.event, "message:new");
    let payload: Value = serde_json::from_slice(&ev.payload).unwrap();
    assert_eq!(payload["message"]["id"], m.id);
    assert_eq!(payload["message"]["content"], "deploy finished");
    // A retry with the same client_message_id returns the original.
    let again = f.client.post_message(request).await.unwrap().into_inner();
    assert_eq!((again.id.as_str(), again.seq), (m.id.as_str(), 1));
    assert_eq!(
        f.post("g3", "alice", "next").await,
        2,
        "no seq used by the retry"
    );
    // Bad metadata is refused.
    let err = f
        .client
        .post_message(PostMessageRequest {
            conversation_id: "g3".into(),
            sender_id: "bot".into(),
            content: "x".into(),
            metadata_json: "not json".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn get_history_pages_oldest_first() {
    let mut f = fixture().await;
    f.upsert("g4", &["alice"]).await;
    for i in 1..=5 {
        f.post("g4", "alice", &format!("m{i}")).await;
    }
    let page = |before_seq, limit| GetHistoryRequest {
        conversation_id: "g4".into(),
        before_seq,
        limit,
    };
    let newest = f.client.get_history(page(0, 2)).await.unwrap().into_inner();
    let seqs: Vec<u64> = newest.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [4, 5], "the newest two, oldest first");
    assert_eq!(newest.messages[1].content, "m5");
    assert!(newest.has_more);
    let older = f
        .client
        .get_history(page(4, 10))
        .await
        .unwrap()
        .into_inner();
    let seqs: Vec<u64> = older.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert!(!older.has_more);
    let all = f.client.get_history(page(0, 0)).await.unwrap().into_inner();
    assert_eq!(all.messages.len(), 5, "limit 0 means the default (50)");
    let err = f.client.get_history(page(0, 101)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn get_unread_counts_follow_read_receipts() {
    let mut f = fixture().await;
    f.upsert("g5", &["alice", "bob"]).await;
    f.upsert("g6", &["bob", "carol"]).await;
    f.upsert("g7", &["alice"]).await;
    for i in 1..=3 {
        f.post("g5", "alice", &format!("m{i}")).await;
    }
    f.post("g6", "carol", "from a bot").await;
    let counts = |user: &str, ids: &[&str]| GetUnreadCountsRequest {
        user_id: user.into(),
        conversation_ids: ids.iter().map(|i| (*i).to_owned()).collect(),
    };
    let mut all = f
        .client
        .get_unread_counts(counts("bob", &[]))
        .await
        .unwrap()
        .into_inner()
        .counts;
    all.sort_by(|a, b| a.conversation_id.cmp(&b.conversation_id));
    let unread = |id: &str, unread, last_seq, read_up_to| UnreadCount {
        conversation_id: id.into(),
        unread,
        last_seq,
        read_up_to,
    };
    assert_eq!(
        all,
        [unread("g5", 3, 3, 0), unread("g6", 1, 1, 0)],
        "only bob's conversations"
    );
    // bob reads up to seq 2.
    let (ok, r) = f.push("bob", "g5", "message:read", json!({"seq": 2})).await;
    assert!(ok, "{r}");
    let one = f
        .client
        .get_unread_counts(counts("bob", &["g5"]))
        .await
        .unwrap()
        .into_inner()
        .counts;
    assert_eq!(one, [unread("g5", 1, 3, 2)]);
    // The sender's own messages are not unread to her.
    let alice = f
        .client
        .get_unread_counts(counts("alice", &["g5"]))
        .await
        .unwrap()
        .into_inner()
        .counts;
    assert_eq!(alice, [unread("g5", 0, 3, 0)]);
    let err = f
        .client
        .get_unread_counts(counts("bob", &["g7"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "not bob's conversation");
}

#[tokio::test]
async fn post_message_refuses_a_sender_who_is_not_a_member_and_stores_nothing() {
    let mut f = fixture().await;
    f.upsert("g9", &["alice"]).await;
    let mut topic = f
        .bus
        .subscribe(&f.subjects.topic("chat:g9"), None)
        .await
        .unwrap();
    for sender in ["mallory", "alice"] {
        if sender == "alice" {
            f.upsert("g9", &["bob"]).await; // alice was removed
        }
        let err = f
            .client
            .post_message(PostMessageRequest {
                conversation_id: "g9".into(),
                sender_id: sender.into(),
                r#type: "text".into(),
                content: format!("as {sender}"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{sender}: {err:?}");
    }
    // Nothing stored, nothing broadcast.
    let history = f
        .client
        .get_history(GetHistoryRequest {
            conversation_id: "g9".into(),
            before_seq: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(history.messages.is_empty(), "{:?}", history.messages);
    let conv = f
        .client
        .get_conversation(GetConversationRequest {
            conversation_id: "g9".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(conv.last_seq, 0);
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), topic.next()).await {
        let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
        assert_ne!(ev.event, "message:new", "nothing broadcast");
    }
    // A conversation that does not exist: refused the same way.
    let err = f
        .client
        .post_message(PostMessageRequest {
            conversation_id: "nosuch".into(),
            sender_id: "alice".into(),
            content: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A member still posts.
    assert_eq!(f.post("g9", "bob", "hi").await, 1);
}

#[tokio::test]
async fn calls_without_the_token_are_unauthenticated_and_change_nothing() {
    let mut f = fixture().await;
    f.upsert("g10", &["alice"]).await;
    let url = format!("http://{}", f.addr);
    let anonymous = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect_lazy();
    let wrong = quckchat_runtime::grpc::client(
        &url,
        &GrpcToken::new("chat-grpc-test-token-0123456788").unwrap(),
    )
    .unwrap();
    let mut anonymous = ChatServiceClient::new(anonymous);
    let mut wrong = ChatServiceClient::new(wrong);
    let history = || GetHistoryRequest {
        conversation_id: "g10".into(),
        before_seq: 0,
        limit: 0,
    };
    let upsert = || UpsertConversationRequest {
        conversation_id: "g10".into(),
        member_ids: vec!["mallory".into()],
    };
    let post = || PostMessageRequest {
        conversation_id: "g10".into(),
        sender_id: "alice".into(),
        content: "forged".into(),
        ..Default::default()
    };
    let codes = [
        anonymous.get_history(history()).await.unwrap_err().code(),
        anonymous
            .upsert_conversation(upsert())
            .await
            .unwrap_err()
            .code(),
        anonymous.post_message(post()).await.unwrap_err().code(),
        wrong.get_history(history()).await.unwrap_err().code(),
        wrong
            .upsert_conversation(upsert())
            .await
            .unwrap_err()
            .code(),
        wrong.post_message(post()).await.unwrap_err().code(),
    ];
    assert_eq!(codes, [Code::Unauthenticated; 6]);
    let conv = f
        .client
        .get_conversation(GetConversationRequest {
            conversation_id: "g10".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(conv.member_ids, ["alice"], "membership unchanged");
    assert_eq!(conv.last_seq, 0, "nothing posted");
}
