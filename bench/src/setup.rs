//! Conversation memberships for a QuckChat run, created through the chat
//! service's gRPC API (`UpsertConversation`), many at a time over one HTTP/2
//! channel — far faster than one `quckchat conversation put` per group.

use std::time::Duration;

use anyhow::Context;
use futures::stream::{self, StreamExt, TryStreamExt};
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::UpsertConversationRequest;

use crate::layout::Layout;

/// Upserts every conversation of `layout` at `grpc_addr`.
pub async fn memberships(grpc_addr: &str, layout: &Layout) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(grpc_addr.to_owned())
        .with_context(|| format!("gRPC address {grpc_addr:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .with_context(|| format!("cannot reach {grpc_addr}"))?;
    let client = ChatServiceClient::new(channel);
    stream::iter(layout.conversations.iter())
        .map(|conversation| {
            let mut client = client.clone();
            let request = UpsertConversationRequest {
                conversation_id: conversation.id.clone(),
                member_ids: layout.members(conversation),
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
