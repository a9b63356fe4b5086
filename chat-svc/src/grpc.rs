//! `quckchat.chat.v1.ChatService` for internal callers (the NestJS backend,
//! other services, `quckchat conversation`).

use std::sync::Arc;

use quckchat_proto::chat::chat_service_server::{ChatService as ChatApi, ChatServiceServer};
use quckchat_proto::chat::{
    ChatMessage, Conversation, GetConversationRequest, GetHistoryRequest, GetHistoryResponse,
    GetUnreadCountsRequest, GetUnreadCountsResponse, ListConversationsRequest,
    ListConversationsResponse, PostMessageRequest, RemoveMemberRequest, UnreadCount,
    UpsertConversationRequest, UserIds,
};
use tonic::{Request, Response, Status};

use quckchat_runtime::grpc::check_id;
use quckchat_runtime::service::Payload;

use crate::service::{parse_send, ChatError, ChatService, HISTORY_DEFAULT, HISTORY_MAX};
use crate::store::{self, StoreError};

pub struct ChatGrpc {
    service: Arc<ChatService>,
}

impl ChatGrpc {
    pub fn server(service: Arc<ChatService>) -> ChatServiceServer<Self> {
        ChatServiceServer::new(Self { service })
    }
}

fn store_status(err: StoreError) -> Status {
    chat_status(err.into())
}

fn chat_status(err: ChatError) -> Status {
    match err {
        ChatError::Unauthorized => Status::not_found("conversation not found"),
        ChatError::NotFound => Status::not_found("message not found"),
        ChatError::Forbidden => Status::permission_denied("only the sender may change a message"),
        ChatError::MessageDeleted => Status::failed_precondition("message deleted"),
        ChatError::InvalidPayload(m) => Status::invalid_argument(m),
        ChatError::Unavailable => Status::unavailable("store unavailable"),
        ChatError::Refused(err) => err.into(),
    }
}

fn to_proto(c: store::Conversation) -> Conversation {
    Conversation {
        conversation_id: c.id,
        member_ids: c.member_ids,
        last_seq: c.last_seq,
    }
}

fn message_to_proto(m: store::Message) -> ChatMessage {
    let iso = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(quckchat_runtime::time::iso).unwrap_or_default()
    };
    ChatMessage {
        created_at: quckchat_runtime::time::iso(m.created_at),
        edited_at: iso(m.edited_at),
        deleted_at: iso(m.deleted_at),
        id: m.id,
        conversation_id: m.conversation_id,
        seq: m.seq,
        sender_id: m.sender_id,
        r#type: m.kind,
        content: m.content,
        client_message_id: m.client_message_id.unwrap_or_default(),
        reply_to: m.reply_to.unwrap_or_default(),
        metadata_json: m
            .metadata
            .map(|v| serde_json::Value::Object(v).to_string())
            .unwrap_or_default(),
        reactions: m
            .reactions
            .into_iter()
            .map(|(k, user_ids)| (k, UserIds { user_ids }))
            .collect(),
    }
}

/// An empty proto string means "not set".
fn set(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[tonic::async_trait]
impl ChatApi for ChatGrpc {
    async fn upsert_conversation(
        &self,
        request: Request<UpsertConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let req = request.into_inner();
        check_id("conversation_id", &req.conversation_id)?;
        for m in &req.member_ids {
            check_id("member_ids", m)?;
        }
        let conv = self
            .service
            .set_members(&req.conversation_id, &req.member_ids)
            .await
            .map_err(store_status)?;
        Ok(Response::new(to_proto(conv)))
    }

    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let req = request.into_inner();
        check_id("conversation_id", &req.conversation_id)?;
        match self
            .service
            .store()
            .conversation(&req.conversation_id)
            .await
            .map_err(store_status)?
        {
            Some(c) => Ok(Response::new(to_proto(c))),
            None => Err(Status::not_found("conversation not found")),
        }
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let req = request.into_inner();
        check_id("conversation_id", &req.conversation_id)?;
        check_id("user_id", &req.user_id)?;
        let conv = self
            .service
            .remove_member(&req.conversation_id, &req.user_id)
            .await
            .map_err(store_status)?;
        Ok(Response::new(to_proto(conv)))
    }

    async fn post_message(
        &self,
        request: Request<PostMessageRequest>,
    ) -> Result<Response<ChatMessage>, Status> {
        let req = request.into_inner();
        check_id("conversation_id", &req.conversation_id)?;
        check_id("sender_id", &req.sender_id)?;
        let mut payload = serde_json::Map::new();
        payload.insert("type".into(), set(&req.r#type).unwrap_or("system").into());
        payload.insert("content".into(), req.content.into());
        if let Some(c) = set(&req.client_message_id) {
            payload.insert("clientMessageId".into(), c.into());
        }
        if let Some(r) = set(&req.reply_to) {
            payload.insert("replyTo".into(), r.into());
        }
        if let Some(m) = set(&req.metadata_json) {
            let v: serde_json::Value = serde_json::from_str(m)
                .map_err(|e| Status::invalid_argument(format!("metadata_json is not JSON: {e}")))?;
            payload.insert("metadata".into(), v);
        }
        let new = parse_send(&req.conversation_id, &req.sender_id, &Payload(payload))
            .map_err(chat_status)?;
        // The backend posts for a user: that user must be a member, as for
        // a socket's message:send.
        self.service
            .check_member(&req.conversation_id, &req.sender_id)
            .await
            .map_err(|e| match e {
                ChatError::Unauthorized => {
                    Status::permission_denied("sender_id is not a member of this conversation")
                }
                e => chat_status(e),
            })?;
        let message = self.service.post(new).await.map_err(chat_status)?;
        Ok(Response::new(message_to_proto(message)))
    }

    async fn get_history(
        &self,
        request: Request<GetHistoryRequest>,
    ) -> Result<Response<GetHistoryResponse>, Status> {
        let req = request.into_inner();
        check_id("conversation_id", &req.conversation_id)?;
        let limit = match req.limit as usize {
            0 => HISTORY_DEFAULT,
            n if n <= HISTORY_MAX => n,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "limit must be at most {HISTORY_MAX}"
                )))
            }
        };
        let before = (req.before_seq > 0).then_some(req.before_seq);
        let page = self
            .service
            .history(&req.conversation_id, before, limit)
            .await
            .map_err(chat_status)?;
        Ok(Response::new(GetHistoryResponse {
            messages: page.messages.into_iter().map(message_to_proto).collect(),
            has_more: page.has_more,
        }))
    }

    async fn list_conversations(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        let req = request.into_inner();
        check_id("user_id", &req.user_id)?;
        let conversations = self
            .service
            .store()
            .conversations_of(&req.user_id)
            .await
            .map_err(store_status)?;
        Ok(Response::new(ListConversationsResponse {
            member_counts: conversations.iter().map(|c| c.members).collect(),
            conversation_ids: conversations.into_iter().map(|c| c.id).collect(),
        }))
    }

    async fn get_unread_counts(
        &self,
        request: Request<GetUnreadCountsRequest>,
    ) -> Result<Response<GetUnreadCountsResponse>, Status> {
        let req = request.into_inner();
        check_id("user_id", &req.user_id)?;
        let store = self.service.store();
        // (conversation, last seq, read position)
        let mut conversations: Vec<(String, u64, u64)> = Vec::new();
        if req.conversation_ids.is_empty() {
            for c in store
                .conversations_of(&req.user_id)
                .await
                .map_err(store_status)?
            {
                let read_up_to = store
                    .read_up_to(&c.id, &req.user_id)
                    .await
                    .map_err(store_status)?;
                conversations.push((c.id, c.last_seq, read_up_to));
            }
        } else {
            for id in &req.conversation_ids {
                check_id("conversation_ids", id)?;
                let Some(state) = store
                    .join_state(id, &req.user_id)
                    .await
                    .map_err(store_status)?
                else {
                    return Err(Status::not_found(format!(
                        "{id}: no such conversation of this user"
                    )));
                };
                conversations.push((id.clone(), state.last_seq, state.read_up_to));
            }
        }
        let mut counts = Vec::with_capacity(conversations.len());
        for (id, last_seq, read_up_to) in conversations {
            counts.push(UnreadCount {
                unread: store
                    .unread_count(&id, &req.user_id)
                    .await
                    .map_err(store_status)?,
                read_up_to,
                last_seq,
                conversation_id: id,
            });
        }
        Ok(Response::new(GetUnreadCountsResponse { counts }))
    }
}
