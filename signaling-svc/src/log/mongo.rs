//! The distributed call log: the `calls` collection of a MongoDB (any
//! MongoDB-wire server).
//!
//! `{_id: callId, callerId, callerDevice, calleeId, calleeDevice, callType,
//! conversationId, stage, createdAt, answeredAt, endedAt, endReason,
//! endedBy, durationMs}`; times are BSON dates, absent options are null.
//! Socket ids are not stored. Indexes `(callerId, createdAt -1, _id -1)` and
//! `(calleeId, createdAt -1, _id -1)`: [`CallLog::calls_of`] reads each side
//! through its own index, newest first and limited, and merges the two.
//! (Two plain finds rather than one `$or` query: any MongoDB-wire server
//! serves them from the index in order, without a merge-sort plan.)
//!
//! [`CallLog::record`] is one upsert whose filter also asks for an earlier
//! stage: a record that would go back matches nothing, its insert hits the
//! `_id` and is dropped.

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Collection, Database, IndexModel};
use quckchat_runtime::mongo::{is_duplicate_key, redact};

use super::{CallLog, Cursor, LogError, MAX_PAGE};
use crate::call::{Call, CallStage, CallType, EndReason};

/// How long the server has to answer at connect.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct MongoCallLog {
    db: Database,
    calls: Collection<Document>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("{what}: {e}"))
}

fn date(ms: i64) -> Bson {
    Bson::DateTime(mongodb::bson::DateTime::from_millis(ms))
}

fn opt_date(ms: Option<i64>) -> Bson {
    ms.map_or(Bson::Null, date)
}

fn opt_str(s: Option<&str>) -> Bson {
    s.map_or(Bson::Null, |s| Bson::String(s.to_owned()))
}

/// Every field but `_id`.
fn call_fields(call: &Call) -> Document {
    doc! {
        "callerId": &call.caller_id,
        "callerDevice": &call.caller_device,
        "calleeId": &call.callee_id,
        "calleeDevice": &call.callee_device,
        "callType": call.call_type.as_str(),
        "conversationId": opt_str(call.conversation_id.as_deref()),
        "stage": call.stage.as_str(),
        "createdAt": date(call.created_at_ms),
        "answeredAt": opt_date(call.answered_at_ms),
        "endedAt": opt_date(call.ended_at_ms),
        "endReason": opt_str(call.end_reason.map(EndReason::as_str)),
        "endedBy": opt_str(call.ended_by.as_deref()),
        "durationMs": call
            .duration_ms()
            .map_or(Bson::Null, |d| Bson::Int64(i64::try_from(d).unwrap_or(i64::MAX))),
    }
}

/// The stages before `stage`, by name.
fn earlier_stages(stage: CallStage) -> Vec<&'static str> {
    [CallStage::Ringing, CallStage::Connected, CallStage::Ended]
        .into_iter()
        .filter(|s| *s < stage)
        .map(CallStage::as_str)
        .collect()
}

fn doc_to_call(d: &Document) -> Option<Call> {
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
    Some(Call {
        id: text("_id")?,
        caller_id: text("callerId")?,
        caller_device: text("callerDevice").unwrap_or_default(),
        caller_conn: String::new(),
        callee_id: text("calleeId")?,
        callee_device: text("calleeDevice").unwrap_or_default(),
        callee_conn: String::new(),
        call_type: CallType::parse(&text("callType")?)?,
        conversation_id: text("conversationId"),
        stage: CallStage::parse(&text("stage")?)?,
        created_at_ms: millis("createdAt")?,
        answered_at_ms: millis("answeredAt"),
        ended_at_ms: millis("endedAt"),
        end_reason: match text("endReason") {
            Some(r) => Some(EndReason::parse(&r)?),
            None => None,
        },
        ended_by: text("endedBy"),
    })
}

/// Decodes documents, skipping (and logging) any that are not a call.
fn decode_all(docs: &[Document]) -> Vec<Call> {
    docs.iter()
        .filter_map(|d| {
            let call = doc_to_call(d);
            if call.is_none() {
                tracing::warn!(id = ?d.get("_id"), "skipping a malformed call log document");
            }
            call
        })
        .collect()
}

/// Newest first: `created_at_ms` descending, then id descending.
fn newest_first(a: &Call, b: &Call) -> std::cmp::Ordering {
    b.created_at_ms
        .cmp(&a.created_at_ms)
        .then_with(|| b.id.cmp(&a.id))
}

impl MongoCallLog {
    /// Connects to `url` (database from its path, else `quckchat`), checks
    /// the server answers within [`CONNECT_TIMEOUT`], and creates the
    /// indexes (idempotent).
    pub async fn connect(url: &str) -> Result<Self, LogError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            LogError::Unavailable(redact(format!("{what}: {e}"), url))
        };
        let timed_out = format!("no answer within {}s", CONNECT_TIMEOUT.as_secs());
        let mut options = tokio::time::timeout(CONNECT_TIMEOUT, ClientOptions::parse(url))
            .await
            .map_err(|_| fail("parse the MongoDB URL", &timed_out))?
            .map_err(|e| fail("parse the MongoDB URL", &e))?;
        options.app_name = Some("quckchat-signaling".into());
        options.server_selection_timeout = Some(CONNECT_TIMEOUT);
        options.connect_timeout = Some(CONNECT_TIMEOUT);
        let database = options
            .default_database
            .clone()
            .unwrap_or_else(|| "quckchat".into());
        let client = mongodb::Client::with_options(options)
            .map_err(|e| fail("create the MongoDB client", &e))?;
        let db = client.database(&database);
        let log = Self {
            calls: db.collection("calls"),
            db,
        };
        // The driver gives up after the server selection timeout; this
        // bounds the whole exchange in case the server accepts but stalls.
        tokio::time::timeout(CONNECT_TIMEOUT * 2, log.ping_server())
            .await
            .map_err(|_| fail("connect to MongoDB", &timed_out))?
            .map_err(|e| fail("connect to MongoDB", &e))?;
        tokio::time::timeout(CONNECT_TIMEOUT * 2, log.create_indexes())
            .await
            .map_err(|_| fail("create the calls indexes", &timed_out))?
            .map_err(|e| fail("create the calls indexes", &e))?;
        Ok(log)
    }

    async fn ping_server(&self) -> mongodb::error::Result<()> {
        self.db.run_command(doc! { "ping": 1 }).await.map(drop)
    }

    async fn create_indexes(&self) -> mongodb::error::Result<()> {
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        self.calls
            .create_indexes([
                index(
                    doc! { "callerId": 1, "createdAt": -1, "_id": -1 },
                    "caller_created",
                ),
                index(
                    doc! { "calleeId": 1, "createdAt": -1, "_id": -1 },
                    "callee_created",
                ),
            ])
            .await
            .map(drop)
    }

    /// Calls matching `filter`, newest first, at most `limit`.
    async fn newest(&self, filter: Document, limit: i64) -> Result<Vec<Call>, LogError> {
        let docs: Vec<Document> = self
            .calls
            .find(filter)
            .sort(doc! { "createdAt": -1, "_id": -1 })
            .limit(limit)
            .await
            .map_err(|e| unavailable("list calls", e))?
            .try_collect()
            .await
            .map_err(|e| unavailable("list calls", e))?;
        Ok(decode_all(&docs))
    }
}

#[async_trait]
impl CallLog for MongoCallLog {
    async fn record(&self, call: &Call) -> Result<(), LogError> {
        let earlier = earlier_stages(call.stage);
        let filter = doc! { "_id": &call.id, "stage": { "$in": &earlier } };
        let update = doc! { "$set": call_fields(call) };
        // A duplicate key means the call is stored at this stage or a later
        // one, or a concurrent first record inserted it between our match
        // and our insert: once more then, now that it exists, decides.
        for _ in 0..2 {
            match self
                .calls
                .update_one(filter.clone(), update.clone())
                .upsert(true)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if is_duplicate_key(&e) && earlier.is_empty() => return Ok(()),
                Err(e) if is_duplicate_key(&e) => continue,
                Err(e) => return Err(unavailable("record call", e)),
            }
        }
        Ok(())
    }

    async fn call(&self, id: &str) -> Result<Option<Call>, LogError> {
        let found = self
            .calls
            .find_one(doc! { "_id": id })
            .await
            .map_err(|e| unavailable("read call", e))?;
        Ok(found.as_ref().and_then(|d| {
            let call = doc_to_call(d);
            if call.is_none() {
                tracing::warn!(id, "malformed call log document");
            }
            call
        }))
    }

    async fn calls_of(
        &self,
        user_id: &str,
        before: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<Call>, LogError> {
        let limit = limit.min(MAX_PAGE);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut as_caller = doc! { "callerId": user_id };
        // A call to oneself is found as the caller's.
        let mut as_callee = doc! { "calleeId": user_id, "callerId": { "$ne": user_id } };
        if let Some(c) = before {
            let older = vec![
                doc! { "createdAt": { "$lt": date(c.created_at_ms) } },
                doc! { "createdAt": date(c.created_at_ms), "_id": { "$lt": &c.id } },
            ];
            as_caller.insert("$or", older.clone());
            as_callee.insert("$or", older);
        }
        let n = i64::from(limit);
        let (mut calls, callee) =
            futures::try_join!(self.newest(as_caller, n), self.newest(as_callee, n))?;
        calls.extend(callee);
        calls.sort_by(newest_first);
        calls.truncate(limit as usize);
        Ok(calls)
    }

    async fn ping(&self) -> Result<(), LogError> {
        self.ping_server().await.map_err(|e| unavailable("ping", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::CallType;
    use futures::FutureExt;

    #[tokio::test]
    async fn mongo_call_log_conformance() {
        let log = MongoCallLog::connect(&quckchat_runtime::testkit::mongodb_url())
            .await
            .unwrap();
        let outcome = std::panic::AssertUnwindSafe(async {
            super::super::conformance::run_all(&log).await;
            documents_are_camel_case(&log).await;
            // Index creation is idempotent.
            log.create_indexes().await.unwrap();
            log.create_indexes().await.unwrap();
            let mut names = log.calls.list_index_names().await.unwrap();
            names.sort();
            assert_eq!(names, vec!["_id_", "callee_created", "caller_created"]);
        })
        .catch_unwind()
        .await;
        // The database is the test's own: gone whether it passed or not.
        log.db.drop().await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    async fn documents_are_camel_case(log: &MongoCallLog) {
        let mut call = Call::ringing(
            crate::call::new_call_id(),
            "alice",
            "phone",
            "conn-1",
            "bob",
            CallType::Video,
            Some("conv-9".into()),
            1_700_000_000_000,
        );
        call.stage = CallStage::Ended;
        call.callee_device = "laptop".into();
        call.callee_conn = "conn-2".into();
        call.answered_at_ms = Some(1_700_000_001_000);
        call.ended_at_ms = Some(1_700_000_031_500);
        call.end_reason = Some(EndReason::Hangup);
        call.ended_by = Some("bob".into());
        log.record(&call).await.unwrap();
        let stored = log
            .calls
            .find_one(doc! { "_id": &call.id })
            .await
            .unwrap()
            .unwrap();
        let dt = |ms| Bson::DateTime(mongodb::bson::DateTime::from_millis(ms));
        assert_eq!(
            stored,
            doc! {
                "_id": &call.id,
                "callerId": "alice",
                "callerDevice": "phone",
                "calleeId": "bob",
                "calleeDevice": "laptop",
                "callType": "video",
                "conversationId": "conv-9",
                "stage": "ended",
                "createdAt": dt(1_700_000_000_000),
                "answeredAt": dt(1_700_000_001_000),
                "endedAt": dt(1_700_000_031_500),
                "endReason": "hangup",
                "endedBy": "bob",
                "durationMs": 30_500_i64,
            }
        );
        let ringing = Call::ringing(
            crate::call::new_call_id(),
            "alice",
            "phone",
            "conn-1",
            "bob",
            CallType::Audio,
            None,
            5,
        );
        log.record(&ringing).await.unwrap();
        let stored = log
            .calls
            .find_one(doc! { "_id": &ringing.id })
            .await
            .unwrap()
            .unwrap();
        for key in [
            "conversationId",
            "answeredAt",
            "endedAt",
            "endReason",
            "endedBy",
            "durationMs",
        ] {
            assert_eq!(stored.get(key), Some(&Bson::Null), "{key}");
        }
        assert!(stored.get("callerConn").is_none() && stored.get("calleeConn").is_none());
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_fast_without_credentials() {
        let started = std::time::Instant::now();
        let err = match MongoCallLog::connect(
            "mongodb://quckchat:s%3Ecr3t-pw@127.0.0.1:1/calls?directConnection=true",
        )
        .await
        {
            Ok(_) => panic!("nothing listens on port 1"),
            Err(LogError::Unavailable(msg)) => msg,
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
    fn earlier_stages_are_strictly_earlier() {
        assert!(earlier_stages(CallStage::Ringing).is_empty());
        assert_eq!(earlier_stages(CallStage::Connected), vec!["ringing"]);
        assert_eq!(
            earlier_stages(CallStage::Ended),
            vec!["ringing", "connected"]
        );
    }
}
