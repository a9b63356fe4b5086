//! The all-in-one store: SQLite (bundled, nothing to install) in WAL mode, in
//! `DATA_DIR/quckchat.db`. One connection serialises writes; each append is
//! one transaction, so `seq` has no gap and a failed send leaves nothing.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    new_message_id, now_millis, Appended, ChatStore, Conversation, Message, NewMessage, StoreError,
};

#[derive(Clone)]
pub struct EmbeddedStore {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conversation_members (
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    user_id TEXT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    seq INTEGER NOT NULL,
    sender_id TEXT NOT NULL,
    type TEXT NOT NULL,
    content TEXT NOT NULL,
    client_message_id TEXT,
    reply_to TEXT,
    metadata TEXT,
    reactions TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL,
    edited_at TEXT,
    deleted_at TEXT,
    UNIQUE (conversation_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_client_message_id
    ON messages (conversation_id, sender_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens (creating) `dir/quckchat.db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        let path = dir.join("quckchat.db");
        let conn =
            Connection::open(&path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection off the async runtime.
    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(unavailable)?
    }
}

fn read_conversation(conn: &Connection, id: &str) -> Result<Option<Conversation>, StoreError> {
    let last_seq: Option<i64> = conn
        .query_row(
            "SELECT last_seq FROM conversations WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    let Some(last_seq) = last_seq else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT user_id FROM conversation_members WHERE conversation_id = ?1 ORDER BY user_id",
        )
        .map_err(unavailable)?;
    let member_ids = stmt
        .query_map([id], |r| r.get::<_, String>(0))
        .map_err(unavailable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unavailable)?;
    Ok(Some(Conversation {
        id: id.to_owned(),
        member_ids,
        last_seq: u64::try_from(last_seq).unwrap_or(0),
    }))
}

fn parse_time(s: Option<String>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
}

const MESSAGE_COLUMNS: &str =
    "id, conversation_id, seq, sender_id, type, content, client_message_id, \
     reply_to, metadata, reactions, created_at, edited_at, deleted_at";

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    let metadata: Option<String> = r.get(8)?;
    let reactions: String = r.get(9)?;
    Ok(Message {
        id: r.get(0)?,
        conversation_id: r.get(1)?,
        seq: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
        sender_id: r.get(3)?,
        kind: r.get(4)?,
        content: r.get(5)?,
        client_message_id: r.get(6)?,
        reply_to: r.get(7)?,
        metadata: metadata.and_then(|m| serde_json::from_str(&m).ok()),
        reactions: serde_json::from_str(&reactions).unwrap_or_default(),
        created_at: parse_time(r.get(10)?).unwrap_or_default(),
        edited_at: parse_time(r.get(11)?),
        deleted_at: parse_time(r.get(12)?),
    })
}

#[async_trait]
impl ChatStore for EmbeddedStore {
    async fn upsert_conversation(
        &self,
        id: &str,
        member_ids: &[String],
    ) -> Result<Conversation, StoreError> {
        let id = id.to_owned();
        let members = member_ids.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            tx.execute("INSERT INTO conversations (id) VALUES (?1) ON CONFLICT (id) DO NOTHING", [&id])
                .map_err(unavailable)?;
            tx.execute("DELETE FROM conversation_members WHERE conversation_id = ?1", [&id])
                .map_err(unavailable)?;
            for m in &members {
                tx.execute(
                    "INSERT OR IGNORE INTO conversation_members (conversation_id, user_id) VALUES (?1, ?2)",
                    params![id, m],
                )
                .map_err(unavailable)?;
            }
            let conv = read_conversation(&tx, &id)?.ok_or(StoreError::ConversationNotFound)?;
            tx.commit().map_err(unavailable)?;
            Ok(conv)
        })
        .await
    }

    async fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let id = id.to_owned();
        self.with(move |conn| read_conversation(conn, &id)).await
    }

    async fn append_message(&self, new: NewMessage) -> Result<Appended, StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            if let Some(cmid) = &new.client_message_id {
                let existing = tx
                    .query_row(
                        &format!(
                            "SELECT {MESSAGE_COLUMNS} FROM messages \
                             WHERE conversation_id = ?1 AND sender_id = ?2 AND client_message_id = ?3"
                        ),
                        params![new.conversation_id, new.sender_id, cmid],
                        row_to_message,
                    )
                    .optional()
                    .map_err(unavailable)?;
                if let Some(message) = existing {
                    return Ok(Appended {
                        message,
                        created: false,
                    });
                }
            }
            let seq: Option<i64> = tx
                .query_row(
                    "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq",
                    [&new.conversation_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            let seq = seq.ok_or(StoreError::ConversationNotFound)?;
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
            tx.execute(
                &format!("INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, '{{}}', ?10, NULL, NULL)"),
                params![
                    message.id,
                    message.conversation_id,
                    seq,
                    message.sender_id,
                    message.kind,
                    message.content,
                    message.client_message_id,
                    message.reply_to,
                    message.metadata.as_ref().map(|m| serde_json::Value::Object(m.clone()).to_string()),
                    quckchat_runtime::time::iso(message.created_at),
                ],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(Appended {
                message,
                created: true,
            })
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_store_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        super::super::conformance::run_all(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store.upsert_conversation("c", &["a".into()]).await.unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            store.conversation("c").await.unwrap().unwrap().member_ids,
            vec!["a"]
        );
    }
}
