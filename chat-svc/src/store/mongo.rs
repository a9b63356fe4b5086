//! The distributed store: MongoDB (any MongoDB-wire server).
//!
//! Collections, shaped for the NestJS backend to read:
//! - `conversations` — shared with the backend: `{_id, participants: [userId]}`.
//!   `_id` and participants may be strings or ObjectIds; we read both and
//!   write strings for conversations we create.
//! - `conversation_seqs` — `{_id: conversationId, seq}`: the last `seq` given.
//! - `messages` — `{_id: ObjectId, conversationId, seq, senderId, type, content,
//!   clientMessageId?, replyTo, metadata, reactions, createdAt, editedAt,
//!   deletedAt}`; unique `(conversationId, seq)` and unique
//!   `(conversationId, senderId, clientMessageId)` where a clientMessageId is set.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};

use super::{
    new_message_id, now_millis, Appended, ChatStore, Conversation, Message, NewMessage, StoreError,
};

#[derive(Clone)]
pub struct MongoStore {
    db: Database,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// `_id` filter matching a string id or the ObjectId it spells.
fn id_filter(id: &str) -> Document {
    match ObjectId::parse_str(id) {
        Ok(oid) => doc! { "_id": { "$in": [id, oid] } },
        Err(_) => doc! { "_id": id },
    }
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

fn to_time(b: Option<&Bson>) -> Option<DateTime<Utc>> {
    match b? {
        Bson::DateTime(d) => DateTime::from_timestamp_millis(d.timestamp_millis()),
        _ => None,
    }
}

fn bson_time(t: DateTime<Utc>) -> Bson {
    Bson::DateTime(mongodb::bson::DateTime::from_millis(t.timestamp_millis()))
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
        seq: match d.get("seq")? {
            Bson::Int64(n) => u64::try_from(*n).ok()?,
            Bson::Int32(n) => u64::try_from(*n).ok()?,
            _ => return None,
        },
        sender_id: str_field("senderId")?,
        kind: str_field("type")?,
        content: str_field("content").unwrap_or_default(),
        client_message_id: str_field("clientMessageId"),
        reply_to: str_field("replyTo"),
        metadata: match json("metadata") {
            Some(serde_json::Value::Object(m)) => Some(m),
            _ => None,
        },
        reactions: match json("reactions") {
            Some(v) => serde_json::from_value(v).unwrap_or_default(),
            None => Default::default(),
        },
        created_at: to_time(d.get("createdAt")).unwrap_or_default(),
        edited_at: to_time(d.get("editedAt")),
        deleted_at: to_time(d.get("deletedAt")),
    })
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

    async fn create_indexes(&self) -> Result<(), StoreError> {
        let seq = IndexModel::builder()
            .keys(doc! { "conversationId": 1, "seq": 1 })
            .options(
                IndexOptions::builder()
                    .unique(true)
                    .name("conversation_seq".to_owned())
                    .build(),
            )
            .build();
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
            .create_indexes([seq, client_id])
            .await
            .map_err(unavailable)?;
        Ok(())
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

    async fn last_seq(&self, id: &str) -> Result<u64, StoreError> {
        let d = self
            .seqs()
            .find_one(doc! { "_id": id })
            .await
            .map_err(unavailable)?;
        Ok(d.and_then(|d| match d.get("seq") {
            Some(Bson::Int64(n)) => u64::try_from(*n).ok(),
            Some(Bson::Int32(n)) => u64::try_from(*n).ok(),
            _ => None,
        })
        .unwrap_or(0))
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

    async fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let Some(d) = self
            .conversations()
            .find_one(id_filter(id))
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let member_ids = match d.get("participants") {
            Some(Bson::Array(a)) => a.iter().filter_map(bson_to_string).collect(),
            _ => Vec::new(),
        };
        Ok(Some(Conversation {
            id: id.to_owned(),
            member_ids,
            last_seq: self.last_seq(id).await?,
        }))
    }

    async fn append_message(&self, new: NewMessage) -> Result<Appended, StoreError> {
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
        let counter = self
            .seqs()
            .find_one_and_update(
                doc! { "_id": &new.conversation_id },
                doc! { "$inc": { "seq": 1_i64 } },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| unavailable("sequence counter missing after upsert"))?;
        let seq = match counter.get("seq") {
            Some(Bson::Int64(n)) => *n,
            Some(Bson::Int32(n)) => i64::from(*n),
            _ => return Err(unavailable("sequence counter is not a number")),
        };
        let message = Message {
            id: new_message_id(),
            conversation_id: new.conversation_id,
            seq: u64::try_from(seq).unwrap_or(0),
            sender_id: new.sender_id,
            kind: new.kind,
            content: new.content,
            client_message_id: new.client_message_id,
            reply_to: new.reply_to,
            metadata: new.metadata,
            reactions: Default::default(),
            created_at: now_millis(),
            edited_at: None,
            deleted_at: None,
        };
        let mut d = doc! {
            "_id": ObjectId::parse_str(&message.id).map_err(unavailable)?,
            "conversationId": &message.conversation_id,
            "seq": seq,
            "senderId": &message.sender_id,
            "type": &message.kind,
            "content": &message.content,
            "replyTo": message.reply_to.as_deref().map_or(Bson::Null, |r| Bson::String(r.to_owned())),
            "metadata": match &message.metadata {
                Some(m) => Bson::Document(mongodb::bson::to_document(m).map_err(unavailable)?),
                None => Bson::Null,
            },
            "reactions": Document::new(),
            "createdAt": bson_time(message.created_at),
            "editedAt": Bson::Null,
            "deletedAt": Bson::Null,
        };
        if let Some(cmid) = &message.client_message_id {
            d.insert("clientMessageId", cmid);
        }
        match self.messages().insert_one(d).await {
            Ok(_) => Ok(Appended {
                message,
                created: true,
            }),
            Err(e) if e.to_string().contains("E11000") => {
                // A concurrent retry of the same send won the race.
                let retry = NewMessage {
                    conversation_id: message.conversation_id,
                    sender_id: message.sender_id,
                    kind: message.kind,
                    content: message.content,
                    client_message_id: message.client_message_id,
                    reply_to: message.reply_to,
                    metadata: message.metadata,
                };
                match self.find_by_client_id(&retry).await? {
                    Some(message) => Ok(Appended {
                        message,
                        created: false,
                    }),
                    None => Err(unavailable(e)),
                }
            }
            Err(e) => Err(unavailable(e)),
        }
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
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Runs the store conformance suite against a real MongoDB-wire server
    /// (`TEST_MONGODB_URL`, started by `scripts/deps.sh`), in a fresh database.
    #[tokio::test]
    async fn mongo_store_conformance() {
        let base = std::env::var("TEST_MONGODB_URL").expect(
            "TEST_MONGODB_URL must name a MongoDB-wire server (scripts/test.sh starts SecantusDB and sets it)",
        );
        let db = format!("qc_test_{}", uuid::Uuid::new_v4().simple());
        let url = with_database(&base, &db);
        let store = MongoStore::connect(&url)
            .await
            .expect("connect to TEST_MONGODB_URL");
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

    /// Puts `db` into a MongoDB URL's path, keeping its options.
    pub(crate) fn with_database(url: &str, db: &str) -> String {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let host_end = base[scheme_end..]
            .find('/')
            .map_or(base.len(), |i| scheme_end + i);
        let mut out = format!("{}/{db}", &base[..host_end]);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }

    #[test]
    fn message_ids_are_object_ids() {
        assert!(ObjectId::parse_str(new_message_id()).is_ok());
    }
}
