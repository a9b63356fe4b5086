//! `quckchat.chat.v1.ChatService` for internal callers (the NestJS backend,
//! other services, `quckchat conversation put`).

use std::sync::Arc;

use quckchat_proto::chat::chat_service_server::{ChatService as ChatApi, ChatServiceServer};
use quckchat_proto::chat::{Conversation, GetConversationRequest, UpsertConversationRequest};
use quckchat_runtime::ids::valid_id;
use tonic::{Request, Response, Status};

use crate::service::ChatService;
use crate::store::{self, StoreError};

pub struct ChatGrpc {
    service: Arc<ChatService>,
}

impl ChatGrpc {
    pub fn server(service: Arc<ChatService>) -> ChatServiceServer<Self> {
        ChatServiceServer::new(Self { service })
    }
}

fn to_status(err: StoreError) -> Status {
    match err {
        StoreError::ConversationNotFound => Status::not_found("conversation not found"),
        StoreError::Unavailable(detail) => {
            tracing::warn!(%detail, "store unavailable");
            Status::unavailable("store unavailable")
        }
    }
}

fn to_proto(c: store::Conversation) -> Conversation {
    Conversation {
        conversation_id: c.id,
        member_ids: c.member_ids,
        last_seq: c.last_seq,
    }
}

fn check_id(what: &str, id: &str) -> Result<(), Status> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{what} must match [A-Za-z0-9_-]{{1,64}}: {id:?}"
        )))
    }
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
            .store()
            .upsert_conversation(&req.conversation_id, &req.member_ids)
            .await
            .map_err(to_status)?;
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
            .map_err(to_status)?
        {
            Some(c) => Ok(Response::new(to_proto(c))),
            None => Err(Status::not_found("conversation not found")),
        }
    }
}
