//! Where conversations and messages live: one trait, two implementations.
//!
//! - [`MongoStore`] (distributed mode): the `conversations` collection shared
//!   with the NestJS backend (`_id`, `participants`), `messages`, and
//!   `conversation_seqs` (one counter per conversation).
//! - [`EmbeddedStore`] (all-in-one): SQLite in WAL mode under `DATA_DIR`.
//!
//! Both pass the [`conformance`] suite. The guarantees callers rely on:
//! - `seq` is per conversation, starts at 1 and increases by one per message,
//!   with no gap even under concurrent writers or a failed write;
//! - a send with a `clientMessageId` already used by the same sender in the
//!   same conversation returns the original message and stores nothing new;
//! - every change to a conversation (a message, an edit, a delete, a
//!   reaction) takes a new, higher value of the conversation's `version`
//!   (increasing, though values may be skipped); a message remembers the version that created it and the one that last
//!   changed it, so a reconnecting client is sent exactly what changed since
//!   the last message it saw ([`ChatStore::changes_since`]);
//! - read state only moves forward.
//!
//! How a change applies to a message ([`MessageChange::apply`]) is decided
//! once, here, for both stores.

mod embedded;
mod mongo;
mod timed;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::Serialize;

pub use embedded::EmbeddedStore;
pub use mongo::MongoStore;
pub use timed::Timed;

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

/// A conversation as listed for one of its members: no member list, so a
/// listing costs the same in a conversation of 2 members and of 10,000.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    pub id: String,
    /// How many members it has.
    pub members: u64,
    /// `seq` of the newest message, 0 when there is none.
    pub last_seq: u64,
}

/// What a member's join needs of a conversation, read by point lookups (no
/// member list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinState {
    /// `seq` of the newest message, 0 when there is none.
    pub last_seq: u64,
    /// The member's read position, 0 when it never read.
    pub read_up_to: u64,
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
    /// emoji → user ids, in the order they reacted
    pub reactions: BTreeMap<String, Vec<String>>,
    #[serde(serialize_with = "iso")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "iso_opt")]
    pub edited_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "iso_opt")]
    pub deleted_at: Option<DateTime<Utc>>,
    /// Conversation version that created this message.
    #[serde(skip)]
    pub created_version: u64,
    /// Conversation version of its latest change.
    #[serde(skip)]
    pub version: u64,
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

/// A change to an existing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageChange {
    /// New content; only the sender, not after delete.
    Edit {
        by: String,
        content: String,
    },
    /// Tombstone: content and metadata cleared, id and seq kept; only the
    /// sender; deleting twice changes nothing.
    Delete {
        by: String,
    },
    /// Per user and emoji, idempotent; not on a deleted message.
    AddReaction {
        by: String,
        emoji: String,
    },
    RemoveReaction {
        by: String,
        emoji: String,
    },
}

impl MessageChange {
    /// Applies the change to `m` at `now`; `Ok(false)` when it changes
    /// nothing (idempotent repeats).
    pub fn apply(&self, m: &mut Message, now: DateTime<Utc>) -> Result<bool, StoreError> {
        match self {
            MessageChange::Edit { by, content } => {
                if &m.sender_id != by {
                    return Err(StoreError::NotSender);
                }
                if m.deleted_at.is_some() {
                    return Err(StoreError::MessageDeleted);
                }
                m.content.clone_from(content);
                m.edited_at = Some(now);
                Ok(true)
            }
            MessageChange::Delete { by } => {
                if &m.sender_id != by {
                    return Err(StoreError::NotSender);
                }
                if m.deleted_at.is_some() {
                    return Ok(false);
                }
                m.content.clear();
                m.metadata = None;
                m.reactions.clear();
                m.deleted_at = Some(now);
                Ok(true)
            }
            MessageChange::AddReaction { by, emoji } => {
                if m.deleted_at.is_some() {
                    return Err(StoreError::MessageDeleted);
                }
                let users = m.reactions.entry(emoji.clone()).or_default();
                if users.contains(by) {
                    return Ok(false);
                }
                users.push(by.clone());
                Ok(true)
            }
            MessageChange::RemoveReaction { by, emoji } => {
                if m.deleted_at.is_some() {
                    return Err(StoreError::MessageDeleted);
                }
                let Some(users) = m.reactions.get_mut(emoji) else {
                    return Ok(false);
                };
                let before = users.len();
                users.retain(|u| u != by);
                let changed = users.len() != before;
                if users.is_empty() {
                    m.reactions.remove(emoji);
                }
                Ok(changed)
            }
        }
    }
}

/// The result of a change.
#[derive(Debug, Clone, PartialEq)]
pub struct Updated {
    pub message: Message,
    /// False when the change was a repeat and nothing was written.
    pub changed: bool,
}

/// Which message: by id or by seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageRef {
    Id(String),
    Seq(u64),
}

/// One page of history, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub messages: Vec<Message>,
    /// Older messages exist before the first one.
    pub has_more: bool,
}

impl Page {
    /// A page from up to `limit + 1` messages fetched newest first: the
    /// extra one only tells that older ones exist.
    pub(crate) fn from_newest_first(mut messages: Vec<Message>, limit: usize) -> Self {
        let has_more = messages.len() > limit;
        messages.truncate(limit);
        messages.reverse();
        Self { messages, has_more }
    }
}

/// What a client that saw up to `last_seq` missed.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// Messages it saw that changed since (edited, deleted, reactions), by seq.
    pub changed: Vec<Message>,
    /// Messages after `last_seq`, oldest first; the newest ones when bounded.
    pub new: Vec<Message>,
    /// False when the bound cut the replay: the client pages the rest with
    /// history from the first new message back.
    pub complete: bool,
}

impl Replay {
    /// A replay from up to `max + 1` new messages fetched newest first and up
    /// to `max + 1` changed ones by seq: an extra one means the bound cut.
    pub(crate) fn bounded(
        new_newest_first: Vec<Message>,
        mut changed: Vec<Message>,
        max: usize,
    ) -> Self {
        let new = Page::from_newest_first(new_newest_first, max);
        let complete = !new.has_more && changed.len() <= max;
        changed.truncate(max);
        Self {
            changed,
            new: new.messages,
            complete,
        }
    }
}

/// A user's read position after `mark_read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadState {
    pub read_up_to: u64,
    /// Whether this call moved it forward.
    pub advanced: bool,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("conversation not found")]
    ConversationNotFound,
    #[error("message not found")]
    MessageNotFound,
    #[error("only the sender may change a message")]
    NotSender,
    #[error("message deleted")]
    MessageDeleted,
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

/// Builds the stored form of a new message.
pub(crate) fn materialize(new: NewMessage, seq: u64, version: u64) -> Message {
    Message {
        id: new_message_id(),
        conversation_id: new.conversation_id,
        seq,
        sender_id: new.sender_id,
        kind: new.kind,
        content: new.content,
        client_message_id: new.client_message_id,
        reply_to: new.reply_to,
        metadata: new.metadata,
        reactions: BTreeMap::new(),
        created_at: now_millis(),
        edited_at: None,
        deleted_at: None,
        created_version: version,
        version,
    }
}

/// A conversation's members as someone else wrote them into the store (the
/// backend updating MongoDB directly). Empty when the conversation is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    pub conversation_id: String,
    pub member_ids: Vec<String>,
}

#[async_trait]
pub trait ChatStore: Send + Sync + 'static {
    /// Creates the conversation or replaces its members; keeps its messages.
    async fn upsert_conversation(
        &self,
        id: &str,
        member_ids: &[String],
    ) -> Result<Conversation, StoreError>;

    /// Removes one member; removing a non-member changes nothing.
    async fn remove_member(&self, id: &str, user_id: &str) -> Result<Conversation, StoreError>;

    async fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError>;

    /// Every conversation `user_id` is a member of, by id.
    async fn conversations_of(&self, user_id: &str)
        -> Result<Vec<ConversationSummary>, StoreError>;

    /// `user_id`'s view of the conversation at join; `None` when there is no
    /// such conversation or `user_id` is not a member. Never reads the member
    /// list: a join costs the same whatever the conversation's size.
    async fn join_state(
        &self,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<Option<JoinState>, StoreError>;

    /// Stores a message with the next `seq` (idempotent by `clientMessageId`).
    ///
    /// The call starts the append and the future it returns resolves once it
    /// is committed. Appends to one conversation get their `seq` in the order
    /// of the calls, however their futures are polled: a caller that starts
    /// them in some order can publish them in that order (seq order) while
    /// their commits overlap.
    fn append_message(&self, new: NewMessage) -> BoxFuture<'static, Result<Appended, StoreError>>;

    async fn message(
        &self,
        conversation_id: &str,
        which: &MessageRef,
    ) -> Result<Option<Message>, StoreError>;

    /// Applies `change` to a message atomically.
    async fn update_message(
        &self,
        conversation_id: &str,
        message_id: &str,
        change: &MessageChange,
    ) -> Result<Updated, StoreError>;

    /// Up to `limit` messages before `before_seq` (or the newest), oldest first.
    async fn history(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// What changed after the client saw `last_seq`, at most `max` messages
    /// of each kind.
    async fn changes_since(
        &self,
        conversation_id: &str,
        last_seq: u64,
        max: usize,
    ) -> Result<Replay, StoreError>;

    /// Moves `user_id`'s read position forward to `seq` (never back).
    async fn mark_read(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
    ) -> Result<ReadState, StoreError>;

    /// `user_id`'s read position, 0 when it never read.
    async fn read_up_to(&self, conversation_id: &str, user_id: &str) -> Result<u64, StoreError>;

    /// Messages from others after the read position, not deleted.
    async fn unread_count(&self, conversation_id: &str, user_id: &str) -> Result<u64, StoreError>;

    /// Membership changes written to the store by others, where the store
    /// can watch for them (MongoDB change streams). `Ok(None)`: every change
    /// goes through this service (the embedded store); an error: the watch
    /// could not start now (the database is down), try again.
    async fn membership_changes(
        &self,
    ) -> Result<Option<futures::stream::BoxStream<'static, MembershipChange>>, StoreError> {
        Ok(None)
    }

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    fn kind(&self) -> &'static str;
}
