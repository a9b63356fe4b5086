//! The chat service's logic: joins and client pushes on `chat:<id>` topics
//! (PROTOCOL.md §3.1), independent of how commands arrive.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use quckchat_proto::bus::{command_reply, ClientCommand, CommandReply, TopicEvent};
use quckchat_runtime::bus::{Bus, Subjects};
use quckchat_runtime::ids::valid_id;
use serde_json::{json, Map, Value};

use crate::store::{ChatStore, Conversation, NewMessage, StoreError, MESSAGE_TYPES};

/// Longest message content, in characters.
pub const MAX_CONTENT_CHARS: usize = 10_000;
/// Longest `clientMessageId`.
pub const MAX_CLIENT_MESSAGE_ID: usize = 128;

/// Why a command was refused; each maps to the reply's `reason`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChatError {
    #[error("unauthorized")]
    Unauthorized,
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
    #[error("unknown event")]
    UnknownEvent(String),
    #[error("invalid topic")]
    InvalidTopic,
    #[error("service unavailable")]
    Unavailable,
}

impl ChatError {
    fn response(&self) -> Value {
        match self {
            ChatError::UnknownEvent(event) => json!({"reason": "unknown event", "event": event}),
            other => json!({"reason": other.to_string()}),
        }
    }
}

impl From<StoreError> for ChatError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::ConversationNotFound => ChatError::Unauthorized,
            StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                ChatError::Unavailable
            }
        }
    }
}

pub struct ChatService {
    store: Arc<dyn ChatStore>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
}

impl ChatService {
    pub fn new(store: Arc<dyn ChatStore>, bus: Arc<dyn Bus>, subjects: Subjects) -> Self {
        Self {
            store,
            bus,
            subjects,
        }
    }

    pub fn store(&self) -> &Arc<dyn ChatStore> {
        &self.store
    }

    /// Handles one command and builds the reply the client will see.
    pub async fn handle(&self, cmd: &ClientCommand) -> CommandReply {
        let result = self.dispatch(cmd).await;
        metrics::counter!(
            "quckchat_chat_commands_total",
            "event" => if cmd.event.starts_with("message:") || cmd.event == "phx_join" { cmd.event.clone() } else { "other".to_owned() },
            "result" => if result.is_ok() { "ok" } else { "error" },
        )
        .increment(1);
        let (status, response) = match result {
            Ok(v) => (command_reply::Status::Ok, v),
            Err(e) => (command_reply::Status::Error, e.response()),
        };
        CommandReply {
            status: status as i32,
            response: response.to_string().into_bytes(),
            followups: Vec::new(),
        }
    }

    async fn dispatch(&self, cmd: &ClientCommand) -> Result<Value, ChatError> {
        let conversation_id = cmd
            .topic
            .strip_prefix("chat:")
            .filter(|id| valid_id(id))
            .ok_or(ChatError::InvalidTopic)?;
        let payload = parse_object(&cmd.payload)?;
        match cmd.event.as_str() {
            "phx_join" => self.join(conversation_id, &cmd.user_id).await,
            "message:send" => self.send(conversation_id, &cmd.user_id, &payload).await,
            other => Err(ChatError::UnknownEvent(other.to_owned())),
        }
    }

    /// The conversation, if `user_id` is one of its members.
    async fn member_of(
        &self,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<Conversation, ChatError> {
        match self.store.conversation(conversation_id).await? {
            Some(c) if c.has_member(user_id) => Ok(c),
            _ => Err(ChatError::Unauthorized),
        }
    }

    async fn join(&self, conversation_id: &str, user_id: &str) -> Result<Value, ChatError> {
        let conv = self.member_of(conversation_id, user_id).await?;
        Ok(json!({
            "conversationId": conv.id,
            "lastSeq": conv.last_seq,
            "readUpTo": 0,
        }))
    }

    async fn send(
        &self,
        conversation_id: &str,
        user_id: &str,
        p: &Map<String, Value>,
    ) -> Result<Value, ChatError> {
        let new = parse_send(conversation_id, user_id, p)?;
        self.member_of(conversation_id, user_id).await?;
        let appended = self.store.append_message(new).await?;
        let body = json!({ "message": appended.message });
        if appended.created {
            self.broadcast(conversation_id, "message:new", &body).await;
        }
        Ok(body)
    }

    /// Publishes an event to every subscriber of the conversation's topic.
    /// The message is already stored: a lost broadcast is recovered by
    /// clients rejoining with `lastSeq`, so failure is logged, not returned.
    async fn broadcast(&self, conversation_id: &str, event: &str, payload: &Value) {
        let topic = format!("chat:{conversation_id}");
        let ev = TopicEvent {
            topic: topic.clone(),
            event: event.to_owned(),
            payload: payload.to_string().into_bytes(),
            exclude_user_id: String::new(),
        };
        let subject = self.subjects.topic(&topic);
        if let Err(err) = self
            .bus
            .publish(&subject, None, Vec::new(), Bytes::from(ev.encode_to_vec()))
            .await
        {
            tracing::warn!(%err, %subject, event, "broadcast not published");
        }
    }
}

fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, ChatError> {
    if payload.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(Value::Null) => Ok(Map::new()),
        _ => Err(ChatError::InvalidPayload("expected an object".into())),
    }
}

fn invalid(msg: impl Into<String>) -> ChatError {
    ChatError::InvalidPayload(msg.into())
}

/// An optional string field (`null` counts as absent).
fn opt_str<'a>(p: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ChatError> {
    match p.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{field} must be a string"))),
    }
}

fn req_str<'a>(p: &'a Map<String, Value>, field: &str) -> Result<&'a str, ChatError> {
    opt_str(p, field)?.ok_or_else(|| invalid(format!("{field} is required")))
}

/// Validates a `message:send` payload.
pub fn parse_send(
    conversation_id: &str,
    user_id: &str,
    p: &Map<String, Value>,
) -> Result<NewMessage, ChatError> {
    if let Some(cid) = opt_str(p, "conversationId")? {
        if cid != conversation_id {
            return Err(invalid("conversationId does not match the topic"));
        }
    }
    let kind = req_str(p, "type")?;
    if !MESSAGE_TYPES.contains(&kind) {
        return Err(invalid(format!(
            "type must be one of {}",
            MESSAGE_TYPES.join(", ")
        )));
    }
    let content = req_str(p, "content")?;
    if content.chars().count() > MAX_CONTENT_CHARS {
        return Err(invalid(format!(
            "content exceeds {MAX_CONTENT_CHARS} characters"
        )));
    }
    if kind == "text" && content.trim().is_empty() {
        return Err(invalid("content must not be empty"));
    }
    let client_message_id = opt_str(p, "clientMessageId")?;
    if client_message_id.is_some_and(|c| c.is_empty() || c.len() > MAX_CLIENT_MESSAGE_ID) {
        return Err(invalid(format!(
            "clientMessageId must be 1 to {MAX_CLIENT_MESSAGE_ID} characters"
        )));
    }
    let reply_to = opt_str(p, "replyTo")?;
    if reply_to.is_some_and(|r| !valid_id(r)) {
        return Err(invalid("replyTo must be a message id"));
    }
    let metadata = match p.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return Err(invalid("metadata must be an object")),
    };
    Ok(NewMessage {
        conversation_id: conversation_id.to_owned(),
        sender_id: user_id.to_owned(),
        kind: kind.to_owned(),
        content: content.to_owned(),
        client_message_id: client_message_id.map(str::to_owned),
        reply_to: reply_to.map(str::to_owned),
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn send_validation_names_the_field() {
        let err = |v: Value| parse_send("c", "u", &obj(v)).unwrap_err().to_string();
        assert_eq!(
            err(json!({"type": "text", "content": 5})),
            "invalid payload: content must be a string"
        );
        assert_eq!(
            err(json!({"type": "text"})),
            "invalid payload: content is required"
        );
        assert!(err(json!({"type": "bogus", "content": "x"})).contains("type must be one of"));
        assert!(err(json!({"content": "x"})).contains("type is required"));
        assert!(err(json!({"type": "text", "content": "x", "metadata": [1]})).contains("metadata"));
        assert!(
            err(json!({"type": "text", "content": "x", "conversationId": "other"}))
                .contains("conversationId")
        );
        assert!(
            err(json!({"type": "text", "content": "x".repeat(MAX_CONTENT_CHARS + 1)}))
                .contains("exceeds")
        );
        assert!(
            err(json!({"type": "text", "content": "x", "clientMessageId": ""}))
                .contains("clientMessageId")
        );
        assert!(err(json!({"type": "text", "content": "  "})).contains("empty"));
    }

    #[test]
    fn send_parses_every_field() {
        let m = parse_send(
            "c",
            "u",
            &obj(json!({"conversationId": "c", "type": "image", "content": "", "clientMessageId": "k",
                        "replyTo": "65a1b2c3d4e5f60718293a4b", "metadata": {"w": 1}})),
        )
        .unwrap();
        assert_eq!(m.kind, "image");
        assert_eq!(m.client_message_id.as_deref(), Some("k"));
        assert_eq!(m.reply_to.as_deref(), Some("65a1b2c3d4e5f60718293a4b"));
        assert_eq!(m.metadata.unwrap()["w"], 1);
    }

    #[test]
    fn payload_must_be_an_object() {
        assert_eq!(
            parse_object(b"[1]").unwrap_err().to_string(),
            "invalid payload: expected an object"
        );
        assert!(parse_object(b"").unwrap().is_empty());
    }
}
