//! Where conversations and messages live: one trait, two implementations.
//!
//! - [`MongoStore`] (distributed mode): the `conversations` collection shared
//!   with the NestJS backend (`_id`, `participants`), `messages`, and
//!   `conversation_seqs` (one counter per conversation).
//! - [`EmbeddedStore`] (all-in-one): SQLite in WAL mode under `DATA_DIR`.
//!
//! Both pass the [`conformance`] suite. The guarantees callers rely on:
//! `seq` is per conversation, starts at 1 and increases by one per message;
//! a send with a `clientMessageId` already used by the same sender in the same
//! conversation returns the original message and stores nothing new.

mod embedded;
mod mongo;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

pub use embedded::EmbeddedStore;
pub use mongo::MongoStore;

/// A conversation as the chat service needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: String,
    pub member_ids: Vec<String>,
    /// `seq` of the newest message, 0 when there is none.
    pub last_seq: u64,
}

impl Conversation {
    pub fn has_member(&self, user_id: &str) -> bool {
        self.member_ids.iter().any(|m| m == user_id)
    }
}

/// Kinds of message a client may send.
pub const MESSAGE_TYPES: &[&str] = &["text", "image", "file", "audio", "video", "system"];

/// A message to store; the store assigns id, seq and time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub conversation_id: String,
    pub sender_id: String,
    pub kind: String,
    pub content: String,
    pub client_message_id: Option<String>,
    pub reply_to: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A stored message, serialized exactly as clients receive it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: String,
    pub conversation_id: String,
    pub seq: u64,
    pub sender_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub content: String,
    pub client_message_id: Option<String>,
    pub reply_to: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// emoji → user ids
    pub reactions: BTreeMap<String, Vec<String>>,
    #[serde(serialize_with = "iso")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "iso_opt")]
    pub edited_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "iso_opt")]
    pub deleted_at: Option<DateTime<Utc>>,
}

fn iso<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&quckchat_runtime::time::iso(*t))
}

fn iso_opt<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => iso(t, s),
        None => s.serialize_none(),
    }
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    pub message: Message,
    /// False when `clientMessageId` matched an earlier send.
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conversation not found")]
    ConversationNotFound,
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Now, at the millisecond precision every store keeps.
pub fn now_millis() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_default()
}

/// Message ids: 24-hex, like the backend's MongoDB ObjectIds.
pub fn new_message_id() -> String {
    mongodb::bson::oid::ObjectId::new().to_hex()
}

#[async_trait]
pub trait ChatStore: Send + Sync + 'static {
    /// Creates the conversation or replaces its members; keeps its messages.
    async fn upsert_conversation(
        &self,
        id: &str,
        member_ids: &[String],
    ) -> Result<Conversation, StoreError>;

    async fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError>;

    /// Stores a message with the next `seq` (idempotent by `clientMessageId`).
    async fn append_message(&self, new: NewMessage) -> Result<Appended, StoreError>;

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    fn kind(&self) -> &'static str;
}
