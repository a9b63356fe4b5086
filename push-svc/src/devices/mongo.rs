//! The distributed device registry: the `devices` collection of a MongoDB
//! (any MongoDB-wire server).
//!
//! `{_id: token, userId, platform: "fcm"|"apns"|"apns-voip", app, locale,
//! updatedAt}`; `app` and `locale` are null when there is none, `updatedAt`
//! is a BSON date. The token is the `_id`, so a token is one document:
//! [`Devices::register`] is one upsert that replaces everything else in it
//! (which also moves it to another user). Index `(userId, _id)`:
//! [`Devices::devices_of`] is one `find({userId: {$in: [...]}})` read in
//! index order.

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Collection, Database, IndexModel};
use quckchat_runtime::mongo::{is_duplicate_key, redact};

use super::{Device, Devices, DevicesError, Platform};

/// How long the server has to answer at connect.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The index [`Devices::devices_of`] reads through.
const USER_INDEX: &str = "user_devices";

/// How many times an upsert that lost a race to insert the same token is
/// tried again (the second try finds the document and replaces it).
const UPSERT_ATTEMPTS: usize = 3;

pub struct MongoDevices {
    db: Database,
    devices: Collection<Document>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> DevicesError {
    DevicesError::Unavailable(format!("{what}: {e}"))
}

fn optional_text(s: Option<&str>) -> Bson {
    s.map_or(Bson::Null, |s| Bson::String(s.to_owned()))
}

fn device_doc(d: &Device) -> Document {
    doc! {
        "_id": &d.token,
        "userId": &d.user_id,
        "platform": d.platform.as_str(),
        "app": optional_text(d.app.as_deref()),
        "locale": optional_text(d.locale.as_deref()),
        "updatedAt": Bson::DateTime(mongodb::bson::DateTime::from_millis(d.updated_at_ms)),
    }
}

fn doc_to_device(d: &Document) -> Option<Device> {
    let text = |k: &str| match d.get(k) {
        Some(Bson::String(s)) => Some(s.clone()),
        _ => None,
    };
    let updated_at_ms = match d.get("updatedAt") {
        Some(Bson::DateTime(t)) => t.timestamp_millis(),
        Some(Bson::Int64(n)) => *n,
        _ => return None,
    };
    Some(Device {
        user_id: text("userId")?,
        platform: Platform::parse(&text("platform")?)?,
        token: text("_id")?,
        app: text("app"),
        locale: text("locale"),
        updated_at_ms,
    })
}

/// Decodes a document, logging one that is not a device (an unknown
/// platform, say, written by a newer version).
fn decode(d: &Document) -> Option<Device> {
    let device = doc_to_device(d);
    if device.is_none() {
        tracing::warn!(
            user = ?d.get("userId"),
            platform = ?d.get("platform"),
            "skipping a device document that cannot be read"
        );
    }
    device
}

impl MongoDevices {
    /// Connects to `url` (database from its path, else `quckchat`), checks
    /// the server answers within [`CONNECT_TIMEOUT`], and creates the
    /// index (idempotent).
    pub async fn connect(url: &str) -> Result<Self, DevicesError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            DevicesError::Unavailable(redact(format!("{what}: {e}"), url))
        };
        let timed_out = format!("no answer within {}s", CONNECT_TIMEOUT.as_secs());
        let mut options = tokio::time::timeout(CONNECT_TIMEOUT, ClientOptions::parse(url))
            .await
            .map_err(|_| fail("parse the MongoDB URL", &timed_out))?
            .map_err(|e| fail("parse the MongoDB URL", &e))?;
        options.app_name = Some("quckchat-push".into());
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
            devices: db.collection("devices"),
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
            .map_err(|_| fail("create the devices index", &timed_out))?
            .map_err(|e| fail("create the devices index", &e))?;
        Ok(store)
    }

    async fn ping_server(&self) -> mongodb::error::Result<()> {
        self.db.run_command(doc! { "ping": 1 }).await.map(drop)
    }

    async fn create_indexes(&self) -> mongodb::error::Result<()> {
        let index = IndexModel::builder()
            .keys(doc! { "userId": 1, "_id": 1 })
            .options(IndexOptions::builder().name(USER_INDEX.to_owned()).build())
            .build();
        self.devices.create_index(index).await.map(drop)
    }
}

#[async_trait]
impl Devices for MongoDevices {
    async fn register(&self, device: &Device) -> Result<(), DevicesError> {
        let replacement = device_doc(device);
        let mut attempt = 1;
        loop {
            match self
                .devices
                .replace_one(doc! { "_id": &device.token }, replacement.clone())
                .upsert(true)
                .await
            {
                Ok(_) => return Ok(()),
                // Two upserts of a new token at once: both miss, one
                // inserts, the other's insert collides. The token exists
                // now, so another try replaces it.
                Err(e) if is_duplicate_key(&e) && attempt < UPSERT_ATTEMPTS => attempt += 1,
                Err(e) => return Err(unavailable("register device", e)),
            }
        }
    }

    async fn unregister(&self, token: &str) -> Result<bool, DevicesError> {
        let deleted = self
            .devices
            .delete_one(doc! { "_id": token })
            .await
            .map_err(|e| unavailable("unregister device", e))?;
        Ok(deleted.deleted_count > 0)
    }

    async fn devices_of(&self, user_ids: &[String]) -> Result<Vec<Device>, DevicesError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let docs: Vec<Document> = self
            .devices
            .find(doc! { "userId": { "$in": user_ids } })
            .sort(doc! { "userId": 1, "_id": 1 })
            .await
            .map_err(|e| unavailable("list devices", e))?
            .try_collect()
            .await
            .map_err(|e| unavailable("list devices", e))?;
        Ok(docs.iter().filter_map(decode).collect())
    }

    async fn ping(&self) -> Result<(), DevicesError> {
        self.ping_server().await.map_err(|e| unavailable("ping", e))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mongo_devices_conformance() {
        let store = Arc::new(
            MongoDevices::connect(&quckchat_runtime::testkit::mongodb_url())
                .await
                .unwrap(),
        );
        let outcome = std::panic::AssertUnwindSafe(async {
            super::super::conformance::run_all(store.clone()).await;
            documents_are_camel_case(&store).await;
            unknown_platforms_are_skipped(&store).await;
            // Index creation is idempotent.
            store.create_indexes().await.unwrap();
            store.create_indexes().await.unwrap();
            let mut names = store.devices.list_index_names().await.unwrap();
            names.sort();
            assert_eq!(names, vec!["_id_", USER_INDEX]);
        })
        .catch_unwind()
        .await;
        // The database is the test's own: gone whether it passed or not.
        store.db.drop().await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    async fn documents_are_camel_case(store: &MongoDevices) {
        let dt = |ms| Bson::DateTime(mongodb::bson::DateTime::from_millis(ms));
        let full = Device {
            user_id: "alice".into(),
            platform: Platform::ApnsVoip,
            token: "camel-token-1".into(),
            app: Some("com.example.voip".into()),
            locale: Some("pt-BR".into()),
            updated_at_ms: 1_700_000_000_123,
        };
        store.register(&full).await.unwrap();
        let stored = store
            .devices
            .find_one(doc! { "_id": &full.token })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            stored,
            doc! {
                "_id": "camel-token-1",
                "userId": "alice",
                "platform": "apns-voip",
                "app": "com.example.voip",
                "locale": "pt-BR",
                "updatedAt": dt(1_700_000_000_123),
            }
        );
        let bare = Device {
            token: "camel-token-2".into(),
            platform: Platform::Fcm,
            app: None,
            locale: None,
            ..full
        };
        store.register(&bare).await.unwrap();
        let stored = store
            .devices
            .find_one(doc! { "_id": &bare.token })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.get("platform"), Some(&Bson::String("fcm".into())));
        assert_eq!(stored.get("app"), Some(&Bson::Null));
        assert_eq!(stored.get("locale"), Some(&Bson::Null));
    }

    async fn unknown_platforms_are_skipped(store: &MongoDevices) {
        let user = "user-with-a-webpush-device".to_owned();
        let known = Device {
            user_id: user.clone(),
            platform: Platform::Apns,
            token: "known-token".into(),
            app: None,
            locale: None,
            updated_at_ms: 7,
        };
        store.register(&known).await.unwrap();
        let mut unknown = device_doc(&known);
        unknown.insert("_id", "unknown-token");
        unknown.insert("platform", "webpush");
        store.devices.insert_one(unknown).await.unwrap();
        assert_eq!(store.devices_of(&[user]).await.unwrap(), vec![known]);
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_fast_without_credentials() {
        let started = std::time::Instant::now();
        let err = match MongoDevices::connect(
            "mongodb://quckchat:s%3Ecr3t-pw@127.0.0.1:1/push?directConnection=true",
        )
        .await
        {
            Ok(_) => panic!("nothing listens on port 1"),
            Err(DevicesError::Unavailable(msg)) => msg,
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
    fn malformed_documents_are_not_devices() {
        let good = device_doc(&Device {
            user_id: "u".into(),
            platform: Platform::Fcm,
            token: "t".into(),
            app: Some("a".into()),
            locale: None,
            updated_at_ms: 7,
        });
        assert!(doc_to_device(&good).is_some());
        for key in ["_id", "userId", "platform", "updatedAt"] {
            let mut bad = good.clone();
            bad.remove(key);
            assert_eq!(doc_to_device(&bad), None, "{key}");
        }
        let mut odd = good.clone();
        odd.insert("platform", "FCM");
        assert_eq!(doc_to_device(&odd), None);
        // A missing optional field is none, like null.
        let mut sparse = good;
        sparse.remove("app");
        sparse.remove("locale");
        let device = doc_to_device(&sparse).unwrap();
        assert_eq!((device.app, device.locale), (None, None));
    }
}
