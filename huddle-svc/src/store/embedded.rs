//! The all-in-one huddle store: SQLite (bundled) in WAL mode, in
//! `DATA_DIR/huddles.sqlite3`.
//!
//! Huddles are written when one starts or ends, so one connection behind a
//! mutex is enough: every operation is one statement, run on a blocking
//! thread ([`tokio::task::spawn_blocking`]) so none blocks the async
//! runtime. A partial index on the open huddles of each conversation, oldest
//! first, serves [`HuddleStore::by_conversation`].
//!
//! [`HuddleStore::end`] is one `UPDATE … WHERE ended_at_ms IS NULL
//! RETURNING …`: only the first end changes the row, and only it reads the
//! huddle back.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{HuddleStore, StoreError, MAX_LISTED};
use crate::huddle::Huddle;

/// The file under the data directory.
pub const FILE_NAME: &str = "huddles.sqlite3";

/// How long a statement waits for a lock held by another connection to the
/// file (another process, or a tool inspecting it).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct EmbeddedHuddleStore {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS huddles (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    title TEXT,
    created_by TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    ended_at_ms INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS huddles_open ON huddles (conversation_id, created_at_ms, id)
    WHERE ended_at_ms IS NULL;
";

/// Columns read back, in [`row_to_huddle`]'s order.
const COLUMNS: &str = "id, conversation_id, title, created_by, created_at_ms, ended_at_ms";

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

fn row_to_huddle(r: &rusqlite::Row<'_>) -> rusqlite::Result<Huddle> {
    Ok(Huddle {
        id: r.get(0)?,
        conversation_id: r.get(1)?,
        title: r.get(2)?,
        created_by: r.get(3)?,
        created_at_ms: r.get(4)?,
        ended_at_ms: r.get(5)?,
    })
}

impl EmbeddedHuddleStore {
    /// Opens (creating it and `dir` if missing) `dir/huddles.sqlite3`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| unavailable(&format!("create {}", dir.display()), e))?;
        let path = dir.join(FILE_NAME);
        let conn = Connection::open(&path)
            .map_err(|e| unavailable(&format!("open {}", path.display()), e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .and_then(|()| conn.execute_batch(SCHEMA))
            .map_err(|e| unavailable(&format!("set up {}", path.display()), e))?;
        conn.set_prepared_statement_cache_capacity(8);
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection, on a blocking thread.
    async fn run<T, F>(&self, what: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // Every operation is one statement: a panic while the lock was
            // held left no transaction open, so the connection is sound.
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn).map_err(|e| unavailable(what, e))
        })
        .await
        .map_err(|e| unavailable(what, e))?
    }
}

#[async_trait]
impl HuddleStore for EmbeddedHuddleStore {
    async fn create(&self, huddle: &Huddle) -> Result<(), StoreError> {
        let h = huddle.clone();
        self.run("create huddle", move |conn| {
            conn.prepare_cached(
                "INSERT INTO huddles (id, conversation_id, title, created_by, created_at_ms, ended_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
            )?
            .execute(params![
                h.id,
                h.conversation_id,
                h.title,
                h.created_by,
                h.created_at_ms,
                h.ended_at_ms
            ])
            .map(drop)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<Huddle>, StoreError> {
        let id = id.to_owned();
        self.run("read huddle", move |conn| {
            conn.prepare_cached(&format!("SELECT {COLUMNS} FROM huddles WHERE id = ?1"))?
                .query_row([&id], row_to_huddle)
                .optional()
        })
        .await
    }

    async fn by_conversation(
        &self,
        conversation_id: &str,
        limit: u32,
    ) -> Result<Vec<Huddle>, StoreError> {
        let limit = limit.min(MAX_LISTED);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let conversation_id = conversation_id.to_owned();
        self.run("list huddles", move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM huddles
                 WHERE conversation_id = ?1 AND ended_at_ms IS NULL
                 ORDER BY created_at_ms, id LIMIT ?2"
            ))?
            .query_map(params![conversation_id, limit], row_to_huddle)?
            .collect()
        })
        .await
    }

    async fn end(&self, id: &str, at_ms: i64) -> Result<Option<Huddle>, StoreError> {
        let id = id.to_owned();
        self.run("end huddle", move |conn| {
            conn.prepare_cached(&format!(
                "UPDATE huddles SET ended_at_ms = ?2 WHERE id = ?1 AND ended_at_ms IS NULL
                 RETURNING {COLUMNS}"
            ))?
            .query_row(params![id, at_ms], row_to_huddle)
            .optional()
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", |conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded_huddle_store_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedHuddleStore::open(dir.path()).unwrap();
        super::super::conformance::run_all(Arc::new(store)).await;
        assert!(dir.path().join(FILE_NAME).is_file());
    }

    #[tokio::test]
    async fn creates_the_directory_uses_wal_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join("data");
        let open = Huddle::new("conv", Some("standup".into()), "alice", 42);
        let ended = Huddle::new("conv", None, "bob", 43);
        {
            let store = EmbeddedHuddleStore::open(&data).unwrap();
            store.create(&open).await.unwrap();
            store.create(&ended).await.unwrap();
            store.end(&ended.id, 50).await.unwrap().unwrap();
        }
        let conn = Connection::open(data.join(FILE_NAME)).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(conn);
        let store = EmbeddedHuddleStore::open(&data).unwrap();
        assert_eq!(store.get(&open.id).await.unwrap(), Some(open.clone()));
        assert_eq!(
            store.get(&ended.id).await.unwrap(),
            Some(Huddle {
                ended_at_ms: Some(50),
                ..ended
            })
        );
        assert_eq!(store.by_conversation("conv", 10).await.unwrap(), vec![open]);
    }

    #[test]
    fn listing_reads_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let sql = format!(
            "EXPLAIN QUERY PLAN SELECT {COLUMNS} FROM huddles
             WHERE conversation_id = ?1 AND ended_at_ms IS NULL
             ORDER BY created_at_ms, id LIMIT ?2"
        );
        let plan: Vec<String> = conn
            .prepare(&sql)
            .unwrap()
            .query_map(params!["c", 5], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("USING INDEX huddles_open"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }
}
