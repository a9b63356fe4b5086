//! What push asks of other services over gRPC: who is online (presence),
//! a conversation's members and a user's unread count (chat).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::{GetConversationRequest, GetUnreadCountsRequest};
use quckchat_proto::presence::presence_service_client::PresenceServiceClient;
use quckchat_proto::presence::GetPresenceRequest;
use quckchat_runtime::grpc::{CallError, GrpcToken, Replicas};
use quckchat_runtime::routes;

/// Longest a push waits for presence or chat.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Users asked about in one presence request.
pub const PRESENCE_BATCH: usize = 1_000;
/// How long a conversation's members are trusted.
const MEMBERS_TTL: Duration = Duration::from_secs(10);

#[async_trait]
pub trait Online: Send + Sync + 'static {
    /// Which of `user_ids` have a live connection.
    async fn online(&self, user_ids: &[String]) -> Result<HashSet<String>, CallError>;
}

#[async_trait]
pub trait ChatInfo: Send + Sync + 'static {
    /// A conversation's members; `None` when it does not exist.
    async fn members(&self, conversation_id: &str) -> Result<Option<Arc<Vec<String>>>, CallError>;
    /// A user's unread messages over every conversation (the badge).
    async fn unread_total(&self, user_id: &str) -> Result<u64, CallError>;
}

pub struct GrpcOnline {
    presence: Replicas,
}

impl GrpcOnline {
    /// `urls`: presence-svc's replicas, comma-separated.
    pub fn new(urls: &str, token: &GrpcToken) -> Result<Self, String> {
        Ok(Self {
            presence: Replicas::new(urls, token, CALL_TIMEOUT, CALL_TIMEOUT)?,
        })
    }
}

#[async_trait]
impl Online for GrpcOnline {
    async fn online(&self, user_ids: &[String]) -> Result<HashSet<String>, CallError> {
        let mut online = HashSet::new();
        for batch in user_ids.chunks(PRESENCE_BATCH) {
            let request = GetPresenceRequest {
                user_ids: batch.to_vec(),
            };
            let users = self
                .presence
                .call(|channel| {
                    let request = request.clone();
                    async move {
                        PresenceServiceClient::new(channel)
                            .get_presence(request)
                            .await
                    }
                })
                .await
                .map_err(|s| CallError::new(routes::PRESENCE, &s))?
                .into_inner()
                .users;
            online.extend(users.into_iter().filter(|u| u.online).map(|u| u.user_id));
        }
        Ok(online)
    }
}

pub struct GrpcChat {
    chat: Replicas,
    members: moka::future::Cache<String, Arc<Vec<String>>>,
}

impl GrpcChat {
    /// `urls`: chat-svc's replicas, comma-separated.
    pub fn new(urls: &str, token: &GrpcToken) -> Result<Self, String> {
        Ok(Self {
            chat: Replicas::new(urls, token, CALL_TIMEOUT, CALL_TIMEOUT)?,
            members: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(MEMBERS_TTL)
                .build(),
        })
    }
}

#[async_trait]
impl ChatInfo for GrpcChat {
    async fn members(&self, conversation_id: &str) -> Result<Option<Arc<Vec<String>>>, CallError> {
        if let Some(hit) = self.members.get(conversation_id).await {
            return Ok(Some(hit));
        }
        let request = GetConversationRequest {
            conversation_id: conversation_id.to_owned(),
        };
        match self
            .chat
            .call(|channel| {
                let request = request.clone();
                async move {
                    ChatServiceClient::new(channel)
                        .get_conversation(request)
                        .await
                }
            })
            .await
        {
            Ok(c) => {
                let members = Arc::new(c.into_inner().member_ids);
                self.members
                    .insert(conversation_id.to_owned(), members.clone())
                    .await;
                Ok(Some(members))
            }
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(CallError::new(routes::CHAT, &s)),
        }
    }

    async fn unread_total(&self, user_id: &str) -> Result<u64, CallError> {
        let request = GetUnreadCountsRequest {
            user_id: user_id.to_owned(),
            conversation_ids: Vec::new(),
        };
        let counts = self
            .chat
            .call(|channel| {
                let request = request.clone();
                async move {
                    ChatServiceClient::new(channel)
                        .get_unread_counts(request)
                        .await
                }
            })
            .await
            .map_err(|s| CallError::new(routes::CHAT, &s))?
            .into_inner()
            .counts;
        Ok(counts.iter().map(|c| c.unread).sum())
    }
}
