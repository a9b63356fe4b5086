//! The distributed store: MongoDB (any MongoDB-wire server).
//!
//! Collections, shaped for the NestJS backend to read:
//! - `conversations` — the backend's own: `{_id, participants: [userId]}`.
//!   `_id` and participants may be strings or ObjectIds; we read both and
//!   write strings for conversations we create. We create no index on it.
//! - `conversation_seqs` — `{_id: conversationId, seq, version}`: the
//!   conversation's change counter (`version`) and a hint of its last `seq`
//!   (at most the true one: it may lag behind, never run ahead).
//! - `messages` — `{_id: ObjectId, conversationId, seq, senderId, type,
//!   content, clientMessageId?, replyTo, metadata, reactions: {emoji: [userId]},
//!   createdAt, editedAt, deletedAt, createdVersion, version}`; unique
//!   `(conversationId, seq)`, unique `(conversationId, senderId,
//!   clientMessageId)` where a clientMessageId is set, and
//!   `(conversationId, version)`.
//! - `read_states` — `{conversationId, userId, readUpTo, readAt}`, unique
//!   `(conversationId, userId)`.
//!
//! No write uses a multi-document transaction. A replica killed inside one
//! would leave the counter document locked until the server expires the
//! transaction (`transactionLifetimeLimitSeconds`, 60 s by default), stalling
//! every send to that conversation on every replica. Here every write is a
//! single-document operation, so a crash at any instant leaves no lock
//! behind, only what it already wrote:
//! - An append takes a `version` with one atomic `$inc` of the counter (a
//!   crash after it skips a version: versions increase, with gaps), then
//!   inserts the message at `seq` = the counter's hint + 1. The unique
//!   `(conversationId, seq)` index decides races: on a duplicate key the
//!   append re-reads the true last seq (the newest message, by index) and
//!   tries the next one; on a duplicate clientMessageId it returns the
//!   message stored first. A message is inserted at `n + 1` only once `n` is
//!   stored, so `seq` starts at 1 and has no gap. Once inserted, `$max`
//!   moves the hint forward; a crash before that leaves it lagging, which
//!   only costs the next writer a retry. `last_seq` is read from `messages`,
//!   never from the hint.
//! - A change (edit, delete, reaction) reads the message, takes a version
//!   and writes the message only if its `version` is still the one read
//!   (optimistic concurrency: a concurrent change of the same message makes
//!   it start over, so none is lost). Replay ([`ChatStore::changes_since`])
//!   needs every change written after a message was stored to have a higher
//!   version than that message's; a version taken before a concurrent append
//!   but written after it would not, so a change that sees the counter moved
//!   on past its version while it wrote takes a fresh one and stamps the
//!   message again. A crash between those two writes can leave the change
//!   unreplayed to a client that saw the concurrent message (it was never
//!   broadcast either); it loses nothing stored.
//!
//! Within a replica, appends to one conversation still run one after another
//! ([`Turns`]), so its broadcasts go out in seq order and its own appends
//! never race each other for a seq.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::options::{
    Acknowledgment, CollectionOptions, IndexOptions, ReturnDocument, WriteConcern,
};
use mongodb::{Collection, Database, IndexModel};
use quckchat_runtime::mongo::is_duplicate_key;

use crate::turns::Turns;

use super::{
    materialize, now_millis, Appended, ChatStore, Conversation, ConversationSummary, JoinState,
    MembershipChange, Message, MessageChange, MessageRef, NewMessage, Page, ReadState, Replay,
    StoreError, Updated,
};

#[derive(Clone)]
pub struct MongoStore {
    db: Database,
    /// The write concern of [`MongoStore::messages`]: the URL's, journaled.
    messages_concern: WriteConcern,
    /// Appends to one conversation run one after another, in call order:
    /// the `seq` order callers rely on (and no seq races within a replica).
    appends: Arc<Turns>,
    /// Where tests stop operations midway ([`MongoStore::pause_at`]).
    #[cfg(any(test, feature = "testsuite"))]
    failpoints: Arc<std::sync::Mutex<Vec<Failpoint>>>,
}

/// Stripes of [`MongoStore::appends`].
const APPEND_STRIPES: usize = 256;

/// Most inserts one append tries: each one lost means another replica
/// stored a message at that seq meanwhile.
const MAX_SEQ_TRIES: usize = 64;

/// Most times one change starts over: each time means a concurrent change of
/// the same message was written meanwhile.
const MAX_CHANGE_TRIES: usize = 64;

/// A point inside a write where a test can stop it ([`MongoStore::pause_at`]).
#[cfg(any(test, feature = "testsuite"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// An append took its version, before inserting.
    AppendVersionTaken,
    /// An append inserted its message, before moving the seq hint.
    AppendInserted,
    /// A change took its version, before writing the message.
    ChangeVersionTaken,
    /// A change wrote the message, before checking the counter.
    ChangeWritten,
}

/// An operation stopped at a [`Step`]. Dropped without [`Paused::resume`],
/// the operation never goes on: it was abandoned midway, like by a crash.
#[cfg(any(test, feature = "testsuite"))]
pub struct Paused {
    /// Resolves when an operation reached the step and stopped there.
    pub reached: tokio::sync::oneshot::Receiver<()>,
    resume: tokio::sync::oneshot::Sender<()>,
}

#[cfg(any(test, feature = "testsuite"))]
impl Paused {
    /// Lets the stopped operation go on.
    pub fn resume(self) {
        let _ = self.resume.send(());
    }
}

#[cfg(any(test, feature = "testsuite"))]
struct Failpoint {
    step: Step,
    reached: tokio::sync::oneshot::Sender<()>,
    resume: tokio::sync::oneshot::Receiver<()>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The write concern messages are stored with: the one `MONGODB_URL` gives
/// (`w=majority`, `wtimeoutMS`, …), or the server's default, with the journal
/// asked for. `w=0` is refused: a message is acknowledged to its sender only
/// once the database acknowledged it.
fn journaled(url_concern: Option<WriteConcern>) -> Result<WriteConcern, StoreError> {
    let mut concern = url_concern.unwrap_or_default();
    if concern.w == Some(Acknowledgment::Nodes(0)) {
        return Err(StoreError::Unavailable(
            "MONGODB_URL asks for w=0 (unacknowledged writes); chat-svc stores a message \
             before acknowledging it, so it needs w=1 or more"
                .into(),
        ));
    }
    concern.journal = Some(true);
    Ok(concern)
}

/// Values matching a string id or the ObjectId it spells.
fn id_values(id: &str) -> Vec<Bson> {
    let mut values = vec![Bson::String(id.to_owned())];
    if let Ok(oid) = ObjectId::parse_str(id) {
        values.push(Bson::ObjectId(oid));
    }
    values
}

fn id_filter(id: &str) -> Document {
    doc! { "_id": { "$in": id_values(id) } }
}

fn bson_to_string(b: &Bson) -> Option<String> {
    match b {
        Bson::String(s) => Some(s.clone()),
        Bson::ObjectId(o) => Some(o.to_hex()),
        Bson::Int32(n) => Some(n.to_string()),
        Bson::Int64(n) => Some(n.to_string()),
        _ => None,
    }
}

fn bson_u64(b: Option<&Bson>) -> Option<u64> {
    match b? {
        Bson::Int64(n) => u64::try_from(*n).ok(),
        Bson::Int32(n) => u64::try_from(*n).ok(),
        Bson::Double(f) if *f >= 0.0 => Some(*f as u64),
        _ => None,
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_time(b: Option<&Bson>) -> Option<DateTime<Utc>> {
    match b? {
        Bson::DateTime(d) => DateTime::from_timestamp_millis(d.timestamp_millis()),
        _ => None,
    }
}

fn bson_time(t: Option<DateTime<Utc>>) -> Bson {
    match t {
        Some(t) => Bson::DateTime(mongodb::bson::DateTime::from_millis(t.timestamp_millis())),
        None => Bson::Null,
    }
}

/// A conversation document's members, as strings.
fn participants(d: &Document) -> Vec<String> {
    match d.get("participants") {
        Some(Bson::Array(a)) => a.iter().filter_map(bson_to_string).collect(),
        _ => Vec::new(),
    }
}

fn doc_to_message(d: &Document) -> Option<Message> {
    let str_field = |k: &str| d.get(k).and_then(bson_to_string);
    let json = |k: &str| match d.get(k) {
        Some(b @ Bson::Document(_)) => Some(b.clone().into_relaxed_extjson()),
        _ => None,
    };
    Some(Message {
        id: str_field("_id")?,
        conversation_id: str_field("conversationId")?,
        seq: bson_u64(d.get("seq"))?,
        sender_id: str_field("senderId")?,
        kind: str_field("type")?,
        content: str_field("content").unwrap_or_default(),
        client_message_id: str_field("clientMessageId"),
        reply_to: str_field("replyTo"),
        metadata: match json("metadata") {
            Some(serde_json::Value::Object(m)) => Some(m),
            _ => None,
        },
        reactions: json("reactions")
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default(),
        created_at: to_time(d.get("createdAt")).unwrap_or_default(),
        edited_at: to_time(d.get("editedAt")),
        deleted_at: to_time(d.get("deletedAt")),
        created_version: bson_u64(d.get("createdVersion")).unwrap_or(0),
        version: bson_u64(d.get("version")).unwrap_or(0),
    })
}

fn metadata_bson(m: &Message) -> Result<Bson, StoreError> {
    match &m.metadata {
        Some(map) => Ok(Bson::Document(
            mongodb::bson::to_document(map).map_err(unavailable)?,
        )),
        None => Ok(Bson::Null),
    }
}

fn reactions_bson(m: &Message) -> Result<Bson, StoreError> {
    Ok(Bson::Document(
        mongodb::bson::to_document(&m.reactions).map_err(unavailable)?,
    ))
}

fn message_to_doc(m: &Message) -> Result<Document, StoreError> {
    let mut d = doc! {
        "_id": ObjectId::parse_str(&m.id).map_err(unavailable)?,
        "conversationId": &m.conversation_id,
        "seq": to_i64(m.seq),
        "senderId": &m.sender_id,
        "type": &m.kind,
        "content": &m.content,
        "replyTo": m.reply_to.clone().map_or(Bson::Null, Bson::String),
        "metadata": metadata_bson(m)?,
        "reactions": reactions_bson(m)?,
        "createdAt": bson_time(Some(m.created_at)),
        "editedAt": bson_time(m.edited_at),
        "deletedAt": bson_time(m.deleted_at),
        "createdVersion": to_i64(m.created_version),
        "version": to_i64(m.version),
    };
    if let Some(cmid) = &m.client_message_id {
        d.insert("clientMessageId", cmid);
    }
    Ok(d)
}

fn message_filter(conversation_id: &str, which: &MessageRef) -> Option<Document> {
    match which {
        MessageRef::Id(id) => {
            Some(doc! { "_id": ObjectId::parse_str(id).ok()?, "conversationId": conversation_id })
        }
        MessageRef::Seq(seq) => {
            Some(doc! { "conversationId": conversation_id, "seq": to_i64(*seq) })
        }
    }
}

impl MongoStore {
    /// Connects to `url` (database from its path, else `quckchat`), checks the
    /// server answers, and creates the indexes (idempotent).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut options = mongodb::options::ClientOptions::parse(url)
            .await
            .map_err(unavailable)?;
        options.app_name = Some("quckchat-chat".into());
        options.server_selection_timeout = Some(std::time::Duration::from_secs(5));
        let database = options
            .default_database
            .clone()
            .unwrap_or_else(|| "quckchat".into());
        let messages_concern = journaled(options.write_concern.clone())?;
        let client = mongodb::Client::with_options(options).map_err(unavailable)?;
        let store = Self {
            db: client.database(&database),
            messages_concern,
            appends: Arc::new(Turns::new(APPEND_STRIPES)),
            #[cfg(any(test, feature = "testsuite"))]
            failpoints: Arc::default(),
        };
        store.ping().await?;
        store.create_indexes().await?;
        Ok(store)
    }

    fn conversations(&self) -> Collection<Document> {
        self.db.collection("conversations")
    }

    fn seqs(&self) -> Collection<Document> {
        self.db.collection("conversation_seqs")
    }

    /// Messages are written journaled (`j: true`): a message is acknowledged
    /// to its sender only once it survives the database being killed. With
    /// the default (`w: 1`, no journal) a standalone server acknowledges
    /// before its journal reaches the disk, and the fault suite's database
    /// kill lost the last acknowledged message of a conversation (its seq
    /// then went to the next message). The seq counters need not be: a lost
    /// counter update is only a hint behind (see `take_version`). The rest
    /// of the URL's write concern (`w`, `wtimeoutMS`) stays: see [`journaled`].
    fn messages(&self) -> Collection<Document> {
        self.db.collection_with_options(
            "messages",
            CollectionOptions::builder()
                .write_concern(self.messages_concern.clone())
                .build(),
        )
    }

    fn read_states(&self) -> Collection<Document> {
        self.db.collection("read_states")
    }

    async fn create_indexes(&self) -> Result<(), StoreError> {
        let index = |keys: Document, name: &str, unique: bool| {
            IndexModel::builder()
                .keys(keys)
                .options(
                    IndexOptions::builder()
                        .unique(unique)
                        .name(name.to_owned())
                        .build(),
                )
                .build()
        };
        let client_id = IndexModel::builder()
            .keys(doc! { "conversationId": 1, "senderId": 1, "clientMessageId": 1 })
            .options(
                IndexOptions::builder()
                    .unique(true)
                    .name("conversation_sender_client_message_id".to_owned())
                    .partial_filter_expression(doc! { "clientMessageId": { "$type": "string" } })
                    .build(),
            )
            .build();
        self.messages()
            .create_indexes([
                index(
                    doc! { "conversationId": 1, "seq": 1 },
                    "conversation_seq",
                    true,
                ),
                client_id,
                index(
                    doc! { "conversationId": 1, "version": 1 },
                    "conversation_version",
                    false,
                ),
            ])
            .await
            .map_err(unavailable)?;
        self.read_states()
            .create_index(index(
                doc! { "conversationId": 1, "userId": 1 },
                "conversation_user",
                true,
            ))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn find_messages(
        &self,
        filter: Document,
        sort: Document,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let docs: Vec<Document> = self
            .messages()
            .find(filter)
            .sort(sort)
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        Ok(docs.iter().filter_map(doc_to_message).collect())
    }

    /// Stops the next operation that reaches `step` there, until resumed
    /// (never, when the [`Paused`] is dropped: a crash at that instant).
    #[cfg(any(test, feature = "testsuite"))]
    pub fn pause_at(&self, step: Step) -> Paused {
        let (reached_tx, reached) = tokio::sync::oneshot::channel();
        let (resume, resume_rx) = tokio::sync::oneshot::channel();
        self.failpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Failpoint {
                step,
                reached: reached_tx,
                resume: resume_rx,
            });
        Paused { reached, resume }
    }

    /// Where a [`Step`] is: stops here when a test armed it.
    #[cfg(any(test, feature = "testsuite"))]
    async fn step(&self, step: Step) {
        let armed = {
            let mut failpoints = self
                .failpoints
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = failpoints.iter().position(|f| f.step == step);
            at.map(|i| failpoints.remove(i))
        };
        if let Some(failpoint) = armed {
            let _ = failpoint.reached.send(());
            if failpoint.resume.await.is_err() {
                // Abandoned: nothing after this point ever runs.
                std::future::pending::<()>().await;
            }
        }
    }

    /// `seq` of the conversation's newest message, 0 when it has none: the
    /// true last seq, read by the `(conversationId, seq)` index.
    async fn last_seq(&self, id: &str) -> Result<u64, StoreError> {
        let newest = self
            .messages()
            .find_one(doc! { "conversationId": id })
            .sort(doc! { "seq": -1 })
            .projection(doc! { "_id": 0, "seq": 1 })
            .await
            .map_err(unavailable)?;
        Ok(newest.and_then(|d| bson_u64(d.get("seq"))).unwrap_or(0))
    }

    fn to_conversation(&self, d: &Document, id: String, last_seq: u64) -> Conversation {
        Conversation {
            id,
            member_ids: participants(d),
            last_seq,
        }
    }

    /// Takes the conversation's next `version` with one atomic `$inc` (no
    /// transaction, nothing held afterwards). Returns it with the counter's
    /// seq hint, which is at most the true last seq.
    async fn take_version(&self, conversation_id: &str) -> Result<(u64, u64), StoreError> {
        for _ in 0..3 {
            let counter = self
                .seqs()
                .find_one_and_update(
                    doc! { "_id": conversation_id },
                    doc! { "$inc": { "version": 1_i64 } },
                )
                .return_document(ReturnDocument::After)
                .await
                .map_err(unavailable)?;
            if let Some(counter) = counter {
                return Ok((
                    bson_u64(counter.get("version")).unwrap_or(0),
                    bson_u64(counter.get("seq")).unwrap_or(0),
                ));
            }
            // The conversation's first write: create its counter, unless
            // another replica just did (an insert, not an upsert, so that
            // racing creators never both take the first version).
            match self
                .seqs()
                .insert_one(doc! { "_id": conversation_id, "seq": 0_i64, "version": 0_i64 })
                .await
            {
                Ok(_) => {}
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(unavailable("version counter missing after creating it"))
    }

    async fn find_by_client_id(&self, new: &NewMessage) -> Result<Option<Message>, StoreError> {
        let Some(cmid) = &new.client_message_id else {
            return Ok(None);
        };
        let found = self
            .messages()
            .find_one(doc! {
                "conversationId": &new.conversation_id,
                "senderId": &new.sender_id,
                "clientMessageId": cmid,
            })
            .await
            .map_err(unavailable)?;
        Ok(found.as_ref().and_then(doc_to_message))
    }

    async fn conversation_exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conversations()
            .find_one(id_filter(id))
            .projection(doc! { "_id": 1 })
            .await
            .map_err(unavailable)?
            .is_some())
    }

    /// [`ChatStore::append_message`] once it is this append's turn.
    async fn append_now(&self, new: NewMessage) -> Result<Appended, StoreError> {
        let (earlier, exists) = futures::try_join!(
            self.find_by_client_id(&new),
            self.conversation_exists(&new.conversation_id)
        )?;
        if let Some(message) = earlier {
            return Ok(Appended {
                message,
                created: false,
            });
        }
        if !exists {
            return Err(StoreError::ConversationNotFound);
        }
        let (version, hint) = self.take_version(&new.conversation_id).await?;
        #[cfg(any(test, feature = "testsuite"))]
        self.step(Step::AppendVersionTaken).await;
        let mut seq = hint + 1;
        let mut tries = 0;
        let message = loop {
            let message = materialize(new.clone(), seq, version);
            let inserted = self.messages().insert_one(message_to_doc(&message)?).await;
            match inserted {
                Ok(_) => break message,
                Err(e) if is_duplicate_key(&e) => {
                    // A retry of the same send stored first (here or on
                    // another replica)…
                    if let Some(message) = self.find_by_client_id(&new).await? {
                        return Ok(Appended {
                            message,
                            created: false,
                        });
                    }
                    // …or another message took this seq: try after the
                    // newest one.
                    tries += 1;
                    if tries >= MAX_SEQ_TRIES {
                        return Err(unavailable(format!("no free seq after {tries} tries: {e}")));
                    }
                    seq = self.last_seq(&new.conversation_id).await? + 1;
                }
                Err(e) => return Err(unavailable(e)),
            }
        };
        #[cfg(any(test, feature = "testsuite"))]
        self.step(Step::AppendInserted).await;
        // The message is stored: a failure here only leaves the hint behind.
        if let Err(err) = self
            .seqs()
            .update_one(
                doc! { "_id": &new.conversation_id },
                doc! { "$max": { "seq": to_i64(message.seq) } },
            )
            .upsert(true)
            .await
        {
            tracing::warn!(%err, conversation_id = %new.conversation_id, "seq hint not advanced");
        }
        Ok(Appended {
            message,
            created: true,
        })
    }

    /// One try of [`ChatStore::update_message`]; `None` when a concurrent
    /// change of the message was written first (start over).
    async fn try_update(
        &self,
        conversation_id: &str,
        filter: &Document,
        change: &MessageChange,
    ) -> Result<Option<Updated>, StoreError> {
        let found = self
            .messages()
            .find_one(filter.clone())
            .await
            .map_err(unavailable)?
            .ok_or(StoreError::MessageNotFound)?;
        let mut m = doc_to_message(&found).ok_or(StoreError::MessageNotFound)?;
        if !change.apply(&mut m, now_millis())? {
            return Ok(Some(Updated {
                message: m,
                changed: false,
            }));
        }
        // The version read (null when the field is missing): the write
        // applies only if nobody changed the message since.
        let read_version = found.get("version").cloned().unwrap_or(Bson::Null);
        let (version, _) = self.take_version(conversation_id).await?;
        #[cfg(any(test, feature = "testsuite"))]
        self.step(Step::ChangeVersionTaken).await;
        let set = doc! {
            "content": &m.content,
            "metadata": metadata_bson(&m)?,
            "reactions": reactions_bson(&m)?,
            "editedAt": bson_time(m.edited_at),
            "deletedAt": bson_time(m.deleted_at),
            "version": to_i64(version),
        };
        let mut unchanged = filter.clone();
        unchanged.insert("version", read_version);
        let written = self
            .messages()
            .update_one(unchanged, doc! { "$set": set })
            .await
            .map_err(unavailable)?;
        if written.matched_count == 0 {
            return Ok(None);
        }
        m.version = version;
        #[cfg(any(test, feature = "testsuite"))]
        self.step(Step::ChangeWritten).await;
        // Replay sends a client that saw message N the changes with a
        // version above N's: a version taken before a concurrent append but
        // written after it would be skipped. When the counter moved on while
        // this change wrote, stamp the message with a version taken now.
        let counter = self
            .seqs()
            .find_one(doc! { "_id": conversation_id })
            .projection(doc! { "version": 1 })
            .await
            .map_err(unavailable)?;
        if counter.and_then(|c| bson_u64(c.get("version"))) > Some(version) {
            let (later, _) = self.take_version(conversation_id).await?;
            let mut ours = filter.clone();
            ours.insert("version", to_i64(version));
            let stamped = self
                .messages()
                .update_one(ours, doc! { "$set": { "version": to_i64(later) } })
                .await
                .map_err(unavailable)?;
            // Unmatched: a later change has already stamped a later version.
            if stamped.matched_count > 0 {
                m.version = later;
            }
        }
        Ok(Some(Updated {
            message: m,
            changed: true,
        }))
    }
}

#[async_trait]
impl ChatStore for MongoStore {
    async fn upsert_conversation(
        &self,
        id: &str,
        member_ids: &[String],
    ) -> Result<Conversation, StoreError> {
        let existing = self
            .conversations()
            .find_one(id_filter(id))
            .await
            .map_err(unavailable)?;
        let key = existing
            .as_ref()
            .and_then(|d| d.get("_id").cloned())
            .unwrap_or_else(|| Bson::String(id.to_owned()));
        self.conversations()
            .update_one(
                doc! { "_id": key },
                doc! { "$set": { "participants": member_ids } },
            )
            .upsert(true)
            .await
            .map_err(unavailable)?;
        self.conversation(id)
            .await?
            .ok_or(StoreError::ConversationNotFound)
    }

    async fn remove_member(&self, id: &str, user_id: &str) -> Result<Conversation, StoreError> {
        let res = self
            .conversations()
            .update_one(
                id_filter(id),
                doc! { "$pull": { "participants": { "$in": id_values(user_id) } } },
            )
            .await
            .map_err(unavailable)?;
        if res.matched_count == 0 {
            return Err(StoreError::ConversationNotFound);
        }
        self.conversation(id)
            .await?
            .ok_or(StoreError::ConversationNotFound)
    }

    async fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let Some(d) = self
            .conversations()
            .find_one(id_filter(id))
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let last_seq = self.last_seq(id).await?;
        Ok(Some(self.to_conversation(&d, id.to_owned(), last_seq)))
    }

    async fn conversations_of(
        &self,
        user_id: &str,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        // The server counts the members: no member list crosses the wire.
        let docs: Vec<Document> = self
            .conversations()
            .aggregate([
                doc! { "$match": { "participants": { "$in": id_values(user_id) } } },
                doc! { "$project": { "members": { "$size": "$participants" } } },
            ])
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(docs.len());
        for d in docs {
            let Some(id) = d.get("_id").and_then(bson_to_string) else {
                continue;
            };
            out.push(ConversationSummary {
                last_seq: self.last_seq(&id).await?,
                members: bson_u64(d.get("members")).unwrap_or(0),
                id,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn join_state(
        &self,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<Option<JoinState>, StoreError> {
        let mut filter = id_filter(conversation_id);
        filter.insert("participants", doc! { "$in": id_values(user_id) });
        let member = self
            .conversations()
            .find_one(filter)
            .projection(doc! { "_id": 1 })
            .await
            .map_err(unavailable)?;
        if member.is_none() {
            return Ok(None);
        }
        let (last_seq, read_up_to) = tokio::try_join!(
            self.last_seq(conversation_id),
            self.read_up_to(conversation_id, user_id)
        )?;
        Ok(Some(JoinState {
            last_seq,
            read_up_to,
        }))
    }

    fn append_message(&self, new: NewMessage) -> BoxFuture<'static, Result<Appended, StoreError>> {
        let (mut turn, ()) = self.appends.take(&new.conversation_id, || ());
        let store = self.clone();
        Box::pin(async move {
            turn.wait().await;
            store.append_now(new).await
        })
    }

    async fn message(
        &self,
        conversation_id: &str,
        which: &MessageRef,
    ) -> Result<Option<Message>, StoreError> {
        let Some(filter) = message_filter(conversation_id, which) else {
            return Ok(None);
        };
        let found = self
            .messages()
            .find_one(filter)
            .await
            .map_err(unavailable)?;
        Ok(found.as_ref().and_then(doc_to_message))
    }

    async fn update_message(
        &self,
        conversation_id: &str,
        message_id: &str,
        change: &MessageChange,
    ) -> Result<Updated, StoreError> {
        let filter = message_filter(conversation_id, &MessageRef::Id(message_id.to_owned()))
            .ok_or(StoreError::MessageNotFound)?;
        for _ in 0..MAX_CHANGE_TRIES {
            if let Some(updated) = self.try_update(conversation_id, &filter, change).await? {
                return Ok(updated);
            }
        }
        Err(unavailable(format!(
            "message changed concurrently {MAX_CHANGE_TRIES} times in a row"
        )))
    }

    async fn history(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut filter = doc! { "conversationId": conversation_id };
        if let Some(before) = before_seq {
            filter.insert("seq", doc! { "$lt": to_i64(before) });
        }
        let newest_first = self
            .find_messages(filter, doc! { "seq": -1 }, limit + 1)
            .await?;
        Ok(Page::from_newest_first(newest_first, limit))
    }

    async fn changes_since(
        &self,
        conversation_id: &str,
        last_seq: u64,
        max: usize,
    ) -> Result<Replay, StoreError> {
        let new = self
            .find_messages(
                doc! { "conversationId": conversation_id, "seq": { "$gt": to_i64(last_seq) } },
                doc! { "seq": -1 },
                max + 1,
            )
            .await?;
        // Changed since the client's last message was created; a lastSeq
        // naming no message (0, or from another database) has none.
        let seen = self
            .message(conversation_id, &MessageRef::Seq(last_seq))
            .await?;
        let changed = match seen {
            None => Vec::new(),
            Some(seen) => {
                self.find_messages(
                    doc! {
                        "conversationId": conversation_id,
                        "seq": { "$lte": to_i64(last_seq) },
                        "version": { "$gt": to_i64(seen.created_version) },
                    },
                    doc! { "seq": 1 },
                    max + 1,
                )
                .await?
            }
        };
        Ok(Replay::bounded(new, changed, max))
    }

    async fn mark_read(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
    ) -> Result<ReadState, StoreError> {
        let res = self
            .read_states()
            .update_one(
                doc! { "conversationId": conversation_id, "userId": user_id, "readUpTo": { "$lt": to_i64(seq) } },
                doc! { "$set": { "readUpTo": to_i64(seq), "readAt": bson_time(Some(now_millis())) } },
            )
            .upsert(true)
            .await;
        let advanced = match res {
            Ok(r) => r.modified_count > 0 || r.upserted_id.is_some(),
            // The position is already at or past `seq`.
            Err(e) if is_duplicate_key(&e) => false,
            Err(e) => return Err(unavailable(e)),
        };
        Ok(ReadState {
            read_up_to: self.read_up_to(conversation_id, user_id).await?,
            advanced,
        })
    }

    async fn read_up_to(&self, conversation_id: &str, user_id: &str) -> Result<u64, StoreError> {
        let d = self
            .read_states()
            .find_one(doc! { "conversationId": conversation_id, "userId": user_id })
            .await
            .map_err(unavailable)?;
        Ok(d.and_then(|d| bson_u64(d.get("readUpTo"))).unwrap_or(0))
    }

    async fn unread_count(&self, conversation_id: &str, user_id: &str) -> Result<u64, StoreError> {
        let read = self.read_up_to(conversation_id, user_id).await?;
        self.messages()
            .count_documents(doc! {
                "conversationId": conversation_id,
                "senderId": { "$ne": user_id },
                "deletedAt": Bson::Null,
                "seq": { "$gt": to_i64(read) },
            })
            .await
            .map_err(unavailable)
    }

    async fn membership_changes(
        &self,
    ) -> Result<Option<futures::stream::BoxStream<'static, MembershipChange>>, StoreError> {
        let stream = self
            .conversations()
            .watch()
            .full_document(mongodb::options::FullDocumentType::UpdateLookup)
            .await
            .map_err(unavailable)?;
        Ok(Some(
            stream
                .filter_map(|event| async move {
                    let event = event
                        .map_err(|err| tracing::warn!(%err, "conversation change stream error"))
                        .ok()?;
                    let conversation_id = event
                        .document_key
                        .as_ref()?
                        .get("_id")
                        .and_then(bson_to_string)?;
                    let member_ids = event
                        .full_document
                        .as_ref()
                        .map(participants)
                        .unwrap_or_default();
                    Some(MembershipChange {
                        conversation_id,
                        member_ids,
                    })
                })
                .boxed(),
        ))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run_command(doc! { "ping": 1 })
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "mongodb"
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashSet;

    use futures::FutureExt;

    use super::super::conformance::text;
    use super::*;
    use quckchat_runtime::testkit::with_database;

    /// A store on a fresh database of the MongoDB-wire server named by
    /// `TEST_MONGODB_URL` (started by `scripts/deps.sh`).
    pub(crate) async fn test_store() -> MongoStore {
        let base = std::env::var("TEST_MONGODB_URL").expect(
            "TEST_MONGODB_URL must name a MongoDB-wire server (scripts/test.sh starts SecantusDB and sets it)",
        );
        let db = format!("qc_test_{}", uuid::Uuid::new_v4().simple());
        MongoStore::connect(&with_database(&base, &db))
            .await
            .expect("connect to TEST_MONGODB_URL")
    }

    #[tokio::test]
    async fn messages_are_written_journaled() {
        let store = test_store().await;
        let journaled = store.messages().write_concern().and_then(|w| w.journal);
        assert_eq!(
            journaled,
            Some(true),
            "an acknowledged message must survive a database kill"
        );
    }

    #[test]
    fn messages_keep_the_urls_write_concern_and_add_the_journal() {
        let majority = WriteConcern::builder()
            .w(Acknowledgment::Majority)
            .w_timeout(std::time::Duration::from_secs(2))
            .build();
        let concern = journaled(Some(majority)).expect("w=majority is acknowledged");
        assert_eq!(concern.w, Some(Acknowledgment::Majority));
        assert_eq!(concern.w_timeout, Some(std::time::Duration::from_secs(2)));
        assert_eq!(concern.journal, Some(true));

        let plain = journaled(None).expect("the server's default");
        assert_eq!((plain.w, plain.journal), (None, Some(true)));

        let unacknowledged = WriteConcern::builder().w(Acknowledgment::Nodes(0)).build();
        let refused = journaled(Some(unacknowledged)).expect_err("w=0 cannot acknowledge");
        assert!(refused.to_string().contains("w=0"), "{refused}");
    }

    #[tokio::test]
    async fn mongo_store_conformance() {
        let store = test_store().await;
        super::super::conformance::run_all(Arc::new(store.clone())).await;
        // Conversations written by the NestJS backend use ObjectIds.
        let oid = ObjectId::new();
        let member = ObjectId::new();
        store
            .conversations()
            .insert_one(doc! { "_id": oid, "participants": [member, "u2"] })
            .await
            .unwrap();
        let conv = store.conversation(&oid.to_hex()).await.unwrap().unwrap();
        assert_eq!(conv.member_ids, vec![member.to_hex(), "u2".to_owned()]);
        let mine = store.conversations_of(&member.to_hex()).await.unwrap();
        assert_eq!(mine.len(), 1);
        let conv = store
            .remove_member(&oid.to_hex(), &member.to_hex())
            .await
            .unwrap();
        assert_eq!(conv.member_ids, vec!["u2".to_owned()]);
        // Index creation is idempotent.
        store.create_indexes().await.unwrap();
        store.db.drop().await.unwrap();
    }

    /// One more replica on `url`: a store with a client of its own.
    async fn replica(url: &str) -> MongoStore {
        MongoStore::connect(url)
            .await
            .expect("connect to TEST_MONGODB_URL")
    }

    fn react(by: &str, emoji: &str) -> MessageChange {
        MessageChange::AddReaction {
            by: by.into(),
            emoji: emoji.into(),
        }
    }

    /// Checks the conversation holds seqs 1..=n, each once, and reports it.
    async fn assert_gap_free(store: &MongoStore, c: &str) -> u64 {
        let page = store.history(c, None, 1000).await.unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        let n = seqs.len() as u64;
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "seq 1..n, no gap, no duplicate"
        );
        assert_eq!(store.conversation(c).await.unwrap().unwrap().last_seq, n);
        n
    }

    /// A replica killed at any step of a send or a change (the step's future
    /// stopped there for good, its connection still open — a transaction
    /// would still hold its locks) holds up no other replica: the next send
    /// and change on another replica go through at once, seq stays gap-free
    /// and a retry of the lost send stores it once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_killed_at_any_step_blocks_no_other_replica() {
        let url = quckchat_runtime::testkit::mongodb_url();
        let other = replica(&url).await;
        // A lock left behind stalls for the transaction lifetime (60 s);
        // unloaded, these take 0.1-0.7 s, but the test server is shared and
        // slows down under load.
        let limit = std::time::Duration::from_secs(10);
        for step in [
            Step::AppendVersionTaken,
            Step::AppendInserted,
            Step::ChangeVersionTaken,
            Step::ChangeWritten,
        ] {
            let killed = replica(&url).await;
            let c = format!("c-{step:?}");
            other
                .upsert_conversation(&c, &["a".into(), "b".into()])
                .await
                .unwrap();
            let mut first = None;
            for i in 0..2 {
                let m = killed
                    .append_message(text(&c, "a", &format!("m{i}"), None))
                    .await
                    .unwrap();
                first.get_or_insert(m.message.id);
            }
            let first = first.unwrap();
            let paused = killed.pause_at(step);
            let lost_send = text(&c, "a", "lost", Some("k-lost"));
            let abandoned = match step {
                Step::AppendVersionTaken | Step::AppendInserted => {
                    tokio::spawn(killed.append_message(lost_send.clone()).map(|_| ()))
                }
                Step::ChangeVersionTaken | Step::ChangeWritten => {
                    let (killed, c, first) = (killed.clone(), c.clone(), first.clone());
                    tokio::spawn(async move {
                        let _ = killed.update_message(&c, &first, &react("a", "👍")).await;
                    })
                }
            };
            let Paused { reached, resume } = paused;
            tokio::time::timeout(std::time::Duration::from_secs(10), reached)
                .await
                .expect("the operation reached the step")
                .unwrap();
            drop(resume); // killed: it never goes on

            let started = std::time::Instant::now();
            let next =
                tokio::time::timeout(limit, other.append_message(text(&c, "b", "after", None)))
                    .await
                    .unwrap_or_else(|_| panic!("{step:?}: a send waited on the killed replica"))
                    .unwrap();
            let send_took = started.elapsed();
            let stored_before_kill = step == Step::AppendInserted;
            assert!(next.created);
            assert_eq!(
                next.message.seq,
                if stored_before_kill { 4 } else { 3 },
                "{step:?}: the next gap-free seq"
            );
            let started = std::time::Instant::now();
            let changed =
                tokio::time::timeout(limit, other.update_message(&c, &first, &react("b", "👍")))
                    .await
                    .unwrap_or_else(|_| panic!("{step:?}: a change waited on the killed replica"))
                    .unwrap();
            let change_took = started.elapsed();
            assert!(changed.changed);
            let reacted = &changed.message.reactions["👍"];
            if step == Step::ChangeWritten {
                assert_eq!(reacted, &["a", "b"], "the killed change was written: kept");
            } else {
                assert_eq!(reacted, &["b"]);
            }
            // The client retries its lost send on the surviving replica.
            let retry = tokio::time::timeout(limit, other.append_message(lost_send))
                .await
                .unwrap_or_else(|_| panic!("{step:?}: a retry waited on the killed replica"))
                .unwrap();
            assert_eq!(retry.created, !stored_before_kill, "{step:?}: stored once");
            let n = assert_gap_free(&other, &c).await;
            assert_eq!(n, 4);
            eprintln!(
                "{step:?}: the other replica's send took {send_took:?}, its change {change_took:?}"
            );
            abandoned.abort();
        }
        other.db.drop().await.unwrap();
    }

    /// Concurrent reactions to one message from two replicas: all kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reactions_from_two_replicas_are_all_kept() {
        let url = quckchat_runtime::testkit::mongodb_url();
        let replicas = [replica(&url).await, replica(&url).await];
        let users: Vec<String> = (0..16).map(|u| format!("u{u:02}")).collect();
        replicas[0].upsert_conversation("c1", &users).await.unwrap();
        let m = replicas[0]
            .append_message(text("c1", "u00", "hi", None))
            .await
            .unwrap()
            .message;
        let tasks: Vec<_> = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let (store, id, u) = (replicas[i % 2].clone(), m.id.clone(), u.clone());
                tokio::spawn(async move {
                    let emoji = if i % 4 == 0 { "🎉" } else { "👍" };
                    let r = store
                        .update_message("c1", &id, &react(&u, emoji))
                        .await
                        .unwrap();
                    assert!(r.changed);
                    r.message.version
                })
            })
            .collect();
        let mut versions = HashSet::new();
        for t in tasks {
            versions.insert(t.await.unwrap());
        }
        assert_eq!(
            versions.len(),
            users.len(),
            "each change has a version of its own"
        );
        let stored = replicas[1]
            .message("c1", &MessageRef::Id(m.id.clone()))
            .await
            .unwrap()
            .unwrap();
        let mut reacted: Vec<String> = stored.reactions.values().flatten().cloned().collect();
        reacted.sort();
        assert_eq!(reacted, users, "no reaction lost: {:?}", stored.reactions);
        assert_eq!(stored.reactions["🎉"].len(), 4);
        assert!(stored.version > m.version);
        replicas[0].db.drop().await.unwrap();
    }

    /// The first sends to new conversations, from two replicas at once: both
    /// stored, with distinct seqs and versions (the counter is created once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_sends_from_two_replicas_both_succeed() {
        let url = quckchat_runtime::testkit::mongodb_url();
        let (a, b) = (replica(&url).await, replica(&url).await);
        for i in 0..20 {
            let c = format!("c{i}");
            a.upsert_conversation(&c, &["a".into()]).await.unwrap();
            let sends = [&a, &b].map(|s| tokio::spawn(s.append_message(text(&c, "a", "x", None))));
            let mut got = Vec::new();
            for send in sends {
                let m = send.await.unwrap().unwrap().message;
                got.push((m.seq, m.created_version));
            }
            got.sort();
            assert_eq!((got[0].0, got[1].0), (1, 2), "{c}: {got:?}");
            assert_ne!(got[0].1, got[1].1, "{c}: one version each: {got:?}");
        }
        a.db.drop().await.unwrap();
    }

    /// A change that took its version before another replica's send but
    /// wrote after that send was stored is still replayed to a client that
    /// saw the send.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_written_after_a_concurrent_send_is_replayed() {
        let url = quckchat_runtime::testkit::mongodb_url();
        for step in [Step::ChangeVersionTaken, Step::ChangeWritten] {
            let (a, b) = (replica(&url).await, replica(&url).await);
            let c = format!("c-{step:?}");
            a.upsert_conversation(&c, &["a".into()]).await.unwrap();
            let m1 = a
                .append_message(text(&c, "a", "m1", None))
                .await
                .unwrap()
                .message;
            let paused = a.pause_at(step);
            let edit = {
                let (a, c, id) = (a.clone(), c.clone(), m1.id.clone());
                tokio::spawn(async move {
                    let edit = MessageChange::Edit {
                        by: "a".into(),
                        content: "m1'".into(),
                    };
                    a.update_message(&c, &id, &edit).await.unwrap()
                })
            };
            let Paused { reached, resume } = paused;
            reached.await.unwrap();
            let mut send = tokio::spawn(b.append_message(text(&c, "a", "m2", None)));
            // The send completes meanwhile, unless the change holds it up.
            let sent_first = tokio::time::timeout(std::time::Duration::from_secs(5), &mut send)
                .await
                .ok();
            let _ = resume.send(());
            edit.await.unwrap();
            let stored_before_the_edit = sent_first.is_some();
            let m2 = match sent_first {
                Some(sent) => sent,
                None => send.await,
            }
            .unwrap()
            .unwrap()
            .message;
            if stored_before_the_edit {
                // A client saw m2, then went away before the edit's broadcast.
                let replay = b.changes_since(&c, m2.seq, 10).await.unwrap();
                let changed: Vec<&str> =
                    replay.changed.iter().map(|m| m.content.as_str()).collect();
                assert_eq!(changed, vec!["m1'"], "{step:?}: the edit is replayed");
            }
            a.db.drop().await.unwrap();
        }
    }

    #[test]
    fn database_goes_into_the_url_path() {
        assert_eq!(
            with_database("mongodb://127.0.0.1:27018/?directConnection=true", "x"),
            "mongodb://127.0.0.1:27018/x?directConnection=true"
        );
        assert_eq!(with_database("mongodb://h:1", "x"), "mongodb://h:1/x");
    }

    #[test]
    fn message_ids_are_object_ids() {
        assert!(ObjectId::parse_str(super::super::new_message_id()).is_ok());
    }
}
