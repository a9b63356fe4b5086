//! The distributed huddle store: the `huddles` collection of a MongoDB (any
//! MongoDB-wire server).
//!
//! `{_id: huddleId, conversationId, title, createdBy, createdAt, endedAt}`;
//! times are BSON dates, a missing title and an open huddle's `endedAt` are
//! null. Index `(conversationId, endedAt, createdAt, _id)`:
//! [`HuddleStore::by_conversation`] asks for `endedAt: null` of one
//! conversation, oldest first (ties by id), and reads it in index order.
//!
//! [`HuddleStore::end`] is one `findOneAndUpdate` whose filter also asks for
//! `endedAt: null`: of replicas ending the same huddle at once, exactly one
//! matches it.

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};
use quckchat_runtime::mongo::{is_duplicate_key, redact};

use super::{HuddleStore, StoreError, MAX_LISTED};
use crate::huddle::Huddle;

/// How long the server has to answer at connect.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The index [`HuddleStore::by_conversation`] reads through.
const OPEN_INDEX: &str = "conversation_open";

pub struct MongoHuddleStore {
    db: Database,
    huddles: Collection<Document>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

fn date(ms: i64) -> Bson {
    Bson::DateTime(mongodb::bson::DateTime::from_millis(ms))
}

fn huddle_doc(h: &Huddle) -> Document {
    doc! {
        "_id": &h.id,
        "conversationId": &h.conversation_id,
        "title": h.title.as_deref().map_or(Bson::Null, |t| Bson::String(t.to_owned())),
        "createdBy": &h.created_by,
        "createdAt": date(h.created_at_ms),
        "endedAt": h.ended_at_ms.map_or(Bson::Null, date),
    }
}

fn doc_to_huddle(d: &Document) -> Option<Huddle> {
    let text = |k: &str| match d.get(k) {
        Some(Bson::String(s)) => Some(s.clone()),
        Some(Bson::ObjectId(o)) => Some(o.to_hex()),
        _ => None,
    };
    let millis = |k: &str| match d.get(k) {
        Some(Bson::DateTime(t)) => Some(t.timestamp_millis()),
        Some(Bson::Int64(n)) => Some(*n),
        _ => None,
    };
    Some(Huddle {
        id: text("_id")?,
        conversation_id: text("conversationId")?,
        title: text("title"),
        created_by: text("createdBy")?,
        created_at_ms: millis("createdAt")?,
        ended_at_ms: millis("endedAt"),
    })
}

/// Decodes a document, logging one that is not a huddle.
fn decode(d: &Document) -> Option<Huddle> {
    let huddle = doc_to_huddle(d);
    if huddle.is_none() {
        tracing::warn!(id = ?d.get("_id"), "skipping a malformed huddle document");
    }
    huddle
}

impl MongoHuddleStore {
    /// Connects to `url` (database from its path, else `quckchat`), checks
    /// the server answers within [`CONNECT_TIMEOUT`], and creates the
    /// index (idempotent).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Unavailable(redact(format!("{what}: {e}"), url))
        };
        let timed_out = format!("no answer within {}s", CONNECT_TIMEOUT.as_secs());
        let mut options = tokio::time::timeout(CONNECT_TIMEOUT, ClientOptions::parse(url))
            .await
            .map_err(|_| fail("parse the MongoDB URL", &timed_out))?
            .map_err(|e| fail("parse the MongoDB URL", &e))?;
        options.app_name = Some("quckchat-huddle".into());
        options.server_selection_timeout = Some(CONNECT_TIMEOUT);
        options.connect_timeout = Some(CONNECT_TIMEOUT);
        let database = options
            .default_database
            .clone()
            .unwrap_or_else(|| "quckchat".into());
        let client = mongodb::Client::with_options(options)
            .map_err(|e| fail("create the MongoDB client", &e))?;
        let db = client.database(&database);
        let store = Self {
            huddles: db.collection("huddles"),
            db,
        };
        // The driver gives up after the server selection timeout; this
        // bounds the whole exchange in case the server accepts but stalls.
        tokio::time::timeout(CONNECT_TIMEOUT * 2, store.ping_server())
            .await
            .map_err(|_| fail("connect to MongoDB", &timed_out))?
            .map_err(|e| fail("connect to MongoDB", &e))?;
        tokio::time::timeout(CONNECT_TIMEOUT * 2, store.create_indexes())
            .await
            .map_err(|_| fail("create the huddles index", &timed_out))?
            .map_err(|e| fail("create the huddles index", &e))?;
        Ok(store)
    }

    async fn ping_server(&self) -> mongodb::error::Result<()> {
        self.db.run_command(doc! { "ping": 1 }).await.map(drop)
    }

    async fn create_indexes(&self) -> mongodb::error::Result<()> {
        let index = IndexModel::builder()
            .keys(doc! { "conversationId": 1, "endedAt": 1, "createdAt": 1, "_id": 1 })
            .options(IndexOptions::builder().name(OPEN_INDEX.to_owned()).build())
            .build();
        self.huddles.create_index(index).await.map(drop)
    }
}

#[async_trait]
impl HuddleStore for MongoHuddleStore {
    async fn create(&self, huddle: &Huddle) -> Result<(), StoreError> {
        match self.huddles.insert_one(huddle_doc(huddle)).await {
            Ok(_) => Ok(()),
            // Stored already: the first one stays.
            Err(e) if is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(unavailable("create huddle", e)),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<Huddle>, StoreError> {
        let found = self
            .huddles
            .find_one(doc! { "_id": id })
            .await
            .map_err(|e| unavailable("read huddle", e))?;
        Ok(found.as_ref().and_then(decode))
    }

    async fn by_conversation(
        &self,
        conversation_id: &str,
        limit: u32,
    ) -> Result<Vec<Huddle>, StoreError> {
        let limit = limit.min(MAX_LISTED);
        // A limit of 0 means "no limit" to the server.
        if limit == 0 {
            return Ok(Vec::new());
        }
        let docs: Vec<Document> = self
            .huddles
            .find(doc! { "conversationId": conversation_id, "endedAt": Bson::Null })
            .sort(doc! { "createdAt": 1, "_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| unavailable("list huddles", e))?
            .try_collect()
            .await
            .map_err(|e| unavailable("list huddles", e))?;
        Ok(docs.iter().filter_map(decode).collect())
    }

    async fn end(&self, id: &str, at_ms: i64) -> Result<Option<Huddle>, StoreError> {
        let ended = self
            .huddles
            .find_one_and_update(
                doc! { "_id": id, "endedAt": Bson::Null },
                doc! { "$set": { "endedAt": date(at_ms) } },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| unavailable("end huddle", e))?;
        Ok(ended.as_ref().and_then(decode))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.ping_server().await.map_err(|e| unavailable("ping", e))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mongo_huddle_store_conformance() {
        let store = Arc::new(
            MongoHuddleStore::connect(&quckchat_runtime::testkit::mongodb_url())
                .await
                .unwrap(),
        );
        let outcome = std::panic::AssertUnwindSafe(async {
            super::super::conformance::run_all(store.clone()).await;
            documents_are_camel_case(&store).await;
            // Index creation is idempotent.
            store.create_indexes().await.unwrap();
            store.create_indexes().await.unwrap();
            let mut names = store.huddles.list_index_names().await.unwrap();
            names.sort();
            assert_eq!(names, vec!["_id_", OPEN_INDEX]);
        })
        .catch_unwind()
        .await;
        // The database is the test's own: gone whether it passed or not.
        store.db.drop().await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    async fn documents_are_camel_case(store: &MongoHuddleStore) {
        let dt = |ms| Bson::DateTime(mongodb::bson::DateTime::from_millis(ms));
        let titled = Huddle::new("conv-9", Some("standup".into()), "alice", 1_700_000_000_123);
        store.create(&titled).await.unwrap();
        store.end(&titled.id, 1_700_000_031_500).await.unwrap();
        let stored = store
            .huddles
            .find_one(doc! { "_id": &titled.id })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            stored,
            doc! {
                "_id": &titled.id,
                "conversationId": "conv-9",
                "title": "standup",
                "createdBy": "alice",
                "createdAt": dt(1_700_000_000_123),
                "endedAt": dt(1_700_000_031_500),
            }
        );
        let open = Huddle::new("conv-9", None, "bob", 5);
        store.create(&open).await.unwrap();
        let stored = store
            .huddles
            .find_one(doc! { "_id": &open.id })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.get("title"), Some(&Bson::Null));
        assert_eq!(stored.get("endedAt"), Some(&Bson::Null));
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_fast_without_credentials() {
        let started = std::time::Instant::now();
        let err = match MongoHuddleStore::connect(
            "mongodb://quckchat:s%3Ecr3t-pw@127.0.0.1:1/huddles?directConnection=true",
        )
        .await
        {
            Ok(_) => panic!("nothing listens on port 1"),
            Err(StoreError::Unavailable(msg)) => msg,
        };
        assert!(
            started.elapsed() < std::time::Duration::from_secs(12),
            "{:?}",
            started.elapsed()
        );
        assert!(err.starts_with("connect to MongoDB: "), "{err}");
        assert!(
            !err.contains("s%3Ecr3t") && !err.contains("s>cr3t"),
            "{err}"
        );
    }

    #[test]
    fn malformed_documents_are_not_huddles() {
        let good = huddle_doc(&Huddle::new("c", None, "u", 7));
        assert!(doc_to_huddle(&good).is_some());
        for key in ["_id", "conversationId", "createdBy", "createdAt"] {
            let mut bad = good.clone();
            bad.remove(key);
            assert_eq!(doc_to_huddle(&bad), None, "{key}");
        }
    }
}
