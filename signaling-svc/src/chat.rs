//! What signaling asks of chat-svc over gRPC: the members of a conversation
//! a call names (both parties must be in it), and the call's message in
//! that conversation once it ended ("Missed voice call", "Video call ·
//! 3:05"), the way messengers show calls in the conversation.

use std::time::Duration;

use async_trait::async_trait;
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::{GetConversationRequest, PostMessageRequest};
use quckchat_runtime::grpc::{CallError, GrpcToken, Replicas};
use quckchat_runtime::routes;
use serde_json::json;

use crate::call::{Call, CallType, EndReason};

/// Longest a call waits for chat.
pub const CHAT_TIMEOUT: Duration = Duration::from_secs(2);

#[async_trait]
pub trait Conversations: Send + Sync + 'static {
    /// The members of `conversation_id`; `None` when it does not exist.
    async fn members(&self, conversation_id: &str) -> Result<Option<Vec<String>>, CallError>;

    /// Posts the call's message (idempotent per call).
    async fn post_call_message(&self, call: &Call) -> Result<(), CallError>;
}

/// The text of a call's message.
pub fn call_message_text(call: &Call) -> String {
    let kind = match call.call_type {
        CallType::Audio => "voice call",
        CallType::Video => "video call",
    };
    match (call.end_reason, call.duration_ms()) {
        (_, Some(ms)) => {
            let secs = ms / 1000;
            let mut text = String::from(kind);
            if let Some(first) = text.get_mut(0..1) {
                first.make_ascii_uppercase();
            }
            format!("{text} · {}:{:02}", secs / 60, secs % 60)
        }
        (Some(EndReason::Rejected), None) => format!("Declined {kind}"),
        _ => format!("Missed {kind}"),
    }
}

pub struct GrpcConversations {
    chat: Replicas,
}

impl GrpcConversations {
    /// `urls`: chat-svc's replicas, comma-separated.
    pub fn new(urls: &str, token: &GrpcToken) -> Result<Self, String> {
        Ok(Self {
            chat: Replicas::new(urls, token, CHAT_TIMEOUT, CHAT_TIMEOUT)?,
        })
    }
}

#[async_trait]
impl Conversations for GrpcConversations {
    async fn members(&self, conversation_id: &str) -> Result<Option<Vec<String>>, CallError> {
        match self
            .chat
            .call(|channel| {
                let request = GetConversationRequest {
                    conversation_id: conversation_id.to_owned(),
                };
                async move {
                    ChatServiceClient::new(channel)
                        .get_conversation(request)
                        .await
                }
            })
            .await
        {
            Ok(c) => Ok(Some(c.into_inner().member_ids)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(CallError::new(routes::CHAT, &s)),
        }
    }

    async fn post_call_message(&self, call: &Call) -> Result<(), CallError> {
        let Some(conversation_id) = &call.conversation_id else {
            return Ok(());
        };
        let metadata = json!({
            "call": {
                "callId": call.id,
                "callType": call.call_type.as_str(),
                "callerId": call.caller_id,
                "calleeId": call.callee_id,
                "reason": call.end_reason.map(EndReason::as_str),
                "durationMs": call.duration_ms(),
            }
        });
        let request = PostMessageRequest {
            conversation_id: conversation_id.clone(),
            sender_id: call.caller_id.clone(),
            r#type: "system".into(),
            content: call_message_text(call),
            // Idempotent: a retry on another replica posts nothing twice.
            client_message_id: format!("call-{}", call.id),
            reply_to: String::new(),
            metadata_json: metadata.to_string(),
        };
        self.chat
            .call(|channel| {
                let request = request.clone();
                async move { ChatServiceClient::new(channel).post_message(request).await }
            })
            .await
            .map(|_| ())
            .map_err(|s| CallError::new(routes::CHAT, &s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::CallStage;

    #[test]
    fn message_texts() {
        let mut call = Call::ringing("c".into(), "a", "d", "k", "b", CallType::Audio, None, 0);
        call.stage = CallStage::Ended;
        call.end_reason = Some(EndReason::NoAnswer);
        call.ended_at_ms = Some(45_000);
        assert_eq!(call_message_text(&call), "Missed voice call");
        call.end_reason = Some(EndReason::Rejected);
        assert_eq!(call_message_text(&call), "Declined voice call");
        call.call_type = CallType::Video;
        call.end_reason = Some(EndReason::Hangup);
        call.answered_at_ms = Some(1_000);
        call.ended_at_ms = Some(186_500);
        assert_eq!(call_message_text(&call), "Video call · 3:05");
    }
}
