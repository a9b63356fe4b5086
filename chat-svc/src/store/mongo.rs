//! The distributed store: MongoDB (any MongoDB-wire server).
//!
//! Collections, shaped for the NestJS backend to read:
//! - `conversations` — the backend's own: `{_id, participants: [userId]}`.
//!   `_id` and participants may be strings or ObjectIds; we read both and
//!   write strings for conversations we create. We create no index on it.
//! - `conversation_seqs` — `{_id: conversationId, seq, version}`: the last
//!   `seq` given and the conversation's change counter.
//! - `messages` — `{_id: ObjectId, conversationId, seq, senderId, type,
//!   content, clientMessageId?, replyTo, metadata, reactions: {emoji: [userId]},
//!   createdAt, editedAt, deletedAt, createdVersion, version}`; unique
//!   `(conversationId, seq)`, unique `(conversationId, senderId,
//!   clientMessageId)` where a clientMessageId is set, and
//!   `(conversationId, version)`.
//! - `read_states` — `{conversationId, userId, readUpTo, readAt}`, unique
//!   `(conversationId, userId)`.
//!
//! Every write that takes a `seq` or a `version` runs in a transaction with
//! the counter, so a failed write leaves no gap; the driver retries
//! transactions that lose a write conflict to a concurrent replica.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{ClientSession, Collection, Database, IndexModel};

use crate::turns::Turns;

use super::{
    materialize, now_millis, Appended, ChatStore, Conversation, MembershipChange, Message,
    MessageChange, MessageRef, NewMessage, Page, ReadState, Replay, StoreError, Updated,
};

#[derive(Clone)]
pub struct MongoStore {
    client: mongodb::Client,
    db: Database,
    /// Appends to one conversation run one after another, in call order:
    /// the `seq` order callers rely on (and no transaction conflicts on the
    /// conversation's counter within a replica).
    appends: Arc<Turns>,
}

/// Stripes of [`MongoStore::appends`].
const APPEND_STRIPES: usize = 256;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A store error raised inside a transaction callback.
fn abort(e: StoreError) -> mongodb::error::Error {
    mongodb::error::Error::custom(e)
}

fn from_driver(e: mongodb::error::Error) -> StoreError {
    match e.get_custom::<StoreError>() {
        Some(se) => se.clone(),
        None => unavailable(e),
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    let code = match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    };
    code == Some(11000) || e.to_string().contains("E11000")
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
        let client = mongodb::Client::with_options(options).map_err(unavailable)?;
        let store = Self {
            db: client.database(&database),
            client,
            appends: Arc::new(Turns::new(APPEND_STRIPES)),
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

    fn messages(&self) -> Collection<Document> {
        self.db.collection("messages")
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

    async fn last_seq(&self, id: &str) -> Result<u64, StoreError> {
        let d = self
            .seqs()
            .find_one(doc! { "_id": id })
            .await
            .map_err(unavailable)?;
        Ok(d.and_then(|d| bson_u64(d.get("seq"))).unwrap_or(0))
    }

    fn to_conversation(&self, d: &Document, id: String, last_seq: u64) -> Conversation {
        Conversation {
            id,
            member_ids: participants(d),
            last_seq,
        }
    }

    /// Takes the next version (and next seq when `new_message`) in `session`.
    async fn bump(
        &self,
        session: &mut ClientSession,
        conversation_id: &str,
        new_message: bool,
    ) -> mongodb::error::Result<(u64, u64)> {
        let inc = if new_message {
            doc! { "seq": 1_i64, "version": 1_i64 }
        } else {
            doc! { "version": 1_i64 }
        };
        let counter = self
            .seqs()
            .find_one_and_update(doc! { "_id": conversation_id }, doc! { "$inc": inc })
            .upsert(true)
            .return_document(ReturnDocument::After)
            .session(session)
            .await?
            .ok_or_else(|| abort(unavailable("sequence counter missing after upsert")))?;
        Ok((
            bson_u64(counter.get("seq")).unwrap_or(0),
            bson_u64(counter.get("version")).unwrap_or(0),
        ))
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

    /// [`ChatStore::append_message`] once it is this append's turn.
    async fn append_now(&self, new: NewMessage) -> Result<Appended, StoreError> {
        if let Some(message) = self.find_by_client_id(&new).await? {
            return Ok(Appended {
                message,
                created: false,
            });
        }
        if self
            .conversations()
            .find_one(id_filter(&new.conversation_id))
            .await
            .map_err(unavailable)?
            .is_none()
        {
            return Err(StoreError::ConversationNotFound);
        }
        let mut session = self.client.start_session().await.map_err(unavailable)?;
        let result = session
            .start_transaction()
            .and_run((self.clone(), new.clone()), |session, (store, new)| {
                async move {
                    let (seq, version) = store.bump(session, &new.conversation_id, true).await?;
                    let message = materialize(new.clone(), seq, version);
                    let d = message_to_doc(&message).map_err(abort)?;
                    store.messages().insert_one(d).session(session).await?;
                    Ok(message)
                }
                .boxed()
            })
            .await;
        match result {
            Ok(message) => Ok(Appended {
                message,
                created: true,
            }),
            Err(e) if is_duplicate_key(&e) => {
                // A concurrent retry of the same send committed first.
                match self.find_by_client_id(&new).await? {
                    Some(message) => Ok(Appended {
                        message,
                        created: false,
                    }),
                    None => Err(unavailable(e)),
                }
            }
            Err(e) => Err(from_driver(e)),
        }
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

    async fn conversations_of(&self, user_id: &str) -> Result<Vec<Conversation>, StoreError> {
        let docs: Vec<Document> = self
            .conversations()
            .find(doc! { "participants": { "$in": id_values(user_id) } })
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
            let last_seq = self.last_seq(&id).await?;
            out.push(self.to_conversation(&d, id, last_seq));
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
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
        let mut session = self.client.start_session().await.map_err(unavailable)?;
        let context = (
            self.clone(),
            filter,
            change.clone(),
            conversation_id.to_owned(),
        );
        session
            .start_transaction()
            .and_run(
                context,
                |session, (store, filter, change, conversation_id)| {
                    async move {
                        let found = store
                            .messages()
                            .find_one(filter.clone())
                            .session(&mut *session)
                            .await?;
                        let mut m = found
                            .as_ref()
                            .and_then(doc_to_message)
                            .ok_or_else(|| abort(StoreError::MessageNotFound))?;
                        if !change.apply(&mut m, now_millis()).map_err(abort)? {
                            return Ok(Updated {
                                message: m,
                                changed: false,
                            });
                        }
                        let (_, version) = store.bump(session, conversation_id, false).await?;
                        m.version = version;
                        let set = doc! {
                            "content": &m.content,
                            "metadata": metadata_bson(&m).map_err(abort)?,
                            "reactions": reactions_bson(&m).map_err(abort)?,
                            "editedAt": bson_time(m.edited_at),
                            "deletedAt": bson_time(m.deleted_at),
                            "version": to_i64(version),
                        };
                        store
                            .messages()
                            .update_one(filter.clone(), doc! { "$set": set })
                            .session(&mut *session)
                            .await?;
                        Ok(Updated {
                            message: m,
                            changed: true,
                        })
                    }
                    .boxed()
                },
            )
            .await
            .map_err(from_driver)
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
    ) -> Option<futures::stream::BoxStream<'static, MembershipChange>> {
        let stream = match self
            .conversations()
            .watch()
            .full_document(mongodb::options::FullDocumentType::UpdateLookup)
            .await
        {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(%err, "cannot watch conversations: backend membership changes apply after the cache TTL");
                return None;
            }
        };
        Some(
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
        )
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
