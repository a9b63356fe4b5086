//! Conversation memberships for a QuckChat run, created through the chat
//! service's gRPC API (`UpsertConversation`), many at a time over one HTTP/2
//! channel — far faster than one `quckchat conversation put` per group.

use std::time::Duration;

use anyhow::Context;
use futures::stream::{self, StreamExt, TryStreamExt};
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::UpsertConversationRequest;
use quckchat_runtime::grpc::{client_with_timeouts, AuthChannel, GrpcToken};

use crate::layout::Layout;

/// The gRPC credential of the servers under test: `GRPC_AUTH_TOKEN` from the
/// environment, else the one the bench gives the servers it spawns.
pub fn grpc_token() -> String {
    std::env::var("GRPC_AUTH_TOKEN").unwrap_or_else(|_| "quckchat-bench-grpc-token".into())
}

/// An authenticated channel to the servers' gRPC API at `grpc_addr`.
pub fn channel(grpc_addr: &str) -> anyhow::Result<AuthChannel> {
    let token =
        GrpcToken::new(&grpc_token()).map_err(|e| anyhow::anyhow!("GRPC_AUTH_TOKEN {e}"))?;
    client_with_timeouts(
        grpc_addr,
        &token,
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
    .map_err(|e| anyhow::anyhow!("gRPC address {e}"))
}

/// Upserts every conversation of `layout` at `grpc_addr`, with
/// `offline_members` more members each who never connect (push).
pub async fn memberships(
    grpc_addr: &str,
    layout: &Layout,
    offline_members: usize,
) -> anyhow::Result<()> {
    let client = ChatServiceClient::new(channel(grpc_addr)?);
    stream::iter(layout.conversations.iter())
        .map(|conversation| {
            let mut client = client.clone();
            let mut member_ids = layout.members(conversation);
            member_ids.extend(crate::push::recipients(
                layout,
                conversation,
                offline_members,
            ));
            let request = UpsertConversationRequest {
                conversation_id: conversation.id.clone(),
                member_ids,
            };
            async move {
                client
                    .upsert_conversation(request)
                    .await
                    .with_context(|| format!("upsert conversation {}", conversation.id))
            }
        })
        .buffer_unordered(32)
        .try_for_each(|_| async { Ok(()) })
        .await
}
