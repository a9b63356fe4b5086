//! presence-svc asks chat-svc for a user's conversations through every
//! address in `CHAT_GRPC_URL`: a replica that is down (or goes down) costs
//! one failed attempt, not the announcement. Conversations over the
//! presence size bound are left out.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use quckchat_presence::service::{ChatMemberships, Memberships};
use quckchat_proto::chat::chat_service_server::{ChatService, ChatServiceServer};
use quckchat_proto::chat::*;
use quckchat_runtime::grpc::{authenticated, GrpcToken};
use quckchat_runtime::presence::MAX_PRESENCE_MEMBERS;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const TOKEN: &str = "presence-chat-replicas-token-0123";

/// A chat replica that knows one membership and counts what it answered.
struct FakeChat {
    name: &'static str,
    answered: Arc<AtomicUsize>,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this test"))
}

#[tonic::async_trait]
impl ChatService for FakeChat {
    async fn upsert_conversation(
        &self,
        _: Request<UpsertConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        unimplemented()
    }
    async fn get_conversation(
        &self,
        _: Request<GetConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        unimplemented()
    }
    async fn remove_member(
        &self,
        _: Request<RemoveMemberRequest>,
    ) -> Result<Response<Conversation>, Status> {
        unimplemented()
    }
    async fn post_message(
        &self,
        _: Request<PostMessageRequest>,
    ) -> Result<Response<ChatMessage>, Status> {
        unimplemented()
    }
    async fn get_history(
        &self,
        _: Request<GetHistoryRequest>,
    ) -> Result<Response<GetHistoryResponse>, Status> {
        unimplemented()
    }
    async fn list_conversations(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        self.answered.fetch_add(1, Ordering::SeqCst);
        let small = format!("{}-{}", self.name, request.into_inner().user_id);
        // The big one carries no per-member presence: never listed.
        Ok(Response::new(ListConversationsResponse {
            conversation_ids: vec![small.clone(), format!("{small}-big")],
            member_counts: vec![2, MAX_PRESENCE_MEMBERS as u64 + 1],
        }))
    }
    async fn get_unread_counts(
        &self,
        _: Request<GetUnreadCountsRequest>,
    ) -> Result<Response<GetUnreadCountsResponse>, Status> {
        unimplemented()
    }
}

/// Serves a fake chat replica until `stop`; returns its URL.
async fn replica(
    name: &'static str,
    answered: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = authenticated(
        tonic::service::Routes::new(ChatServiceServer::new(FakeChat { name, answered })),
        &GrpcToken::new(TOKEN).unwrap(),
    );
    let server = tonic::transport::Server::builder().add_routes(routes.into());
    tokio::spawn(server.serve_with_incoming_shutdown(
        tonic::transport::server::TcpIncoming::from(listener),
        stop.cancelled_owned(),
    ));
    format!("http://{addr}")
}

/// An address nothing listens on.
async fn dead_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn a_dead_first_address_is_skipped_and_a_replica_lost_later_too() {
    let (a_count, b_count) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop_a = CancellationToken::new();
    let a = replica("a", a_count.clone(), stop_a.clone()).await;
    let b = replica("b", b_count.clone(), CancellationToken::new()).await;
    let token = GrpcToken::new(TOKEN).unwrap();

    // The first address is down from the start.
    let memberships =
        ChatMemberships::new(&format!("{},{a}", dead_address().await), &token).unwrap();
    let got = memberships.conversations_of("u1").await.unwrap();
    assert_eq!(*got, vec!["a-u1".to_owned()]);

    // Two live replicas; the one in use goes away.
    let memberships = ChatMemberships::new(&format!("{a}, {b}"), &token).unwrap();
    assert_eq!(
        *memberships.conversations_of("u2").await.unwrap(),
        vec!["a-u2".to_owned()]
    );
    stop_a.cancel();
    // Give the server a moment to close its connections.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    assert_eq!(
        *memberships.conversations_of("u3").await.unwrap(),
        vec!["b-u3".to_owned()]
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // And it stays with the replica that answered.
    assert_eq!(
        *memberships.conversations_of("u4").await.unwrap(),
        vec!["b-u4".to_owned()]
    );
    assert_eq!(b_count.load(Ordering::SeqCst), 2);

    // Every replica down: the error says so.
    let memberships = ChatMemberships::new(
        &format!("{},{}", dead_address().await, dead_address().await),
        &token,
    )
    .unwrap();
    let err = memberships.conversations_of("u5").await.unwrap_err();
    assert_eq!(err.code, tonic::Code::Unavailable, "{err}");
}
