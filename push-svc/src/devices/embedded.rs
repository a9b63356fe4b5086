//! The all-in-one device registry: SQLite (bundled) in WAL mode, in
//! `DATA_DIR/devices.sqlite3`.
//!
//! Devices are written when an app registers a token, so one connection
//! behind a mutex is enough; every operation runs on a blocking thread
//! ([`tokio::task::spawn_blocking`]) so none blocks the async runtime.
//!
//! The token is the primary key, so a token is one row:
//! [`Devices::register`] is one `INSERT … ON CONFLICT (token) DO UPDATE`
//! (which also moves it to another user). [`Devices::devices_of`] asks
//! `user_id IN (…)` through the `(user_id, token)` index, at most
//! [`IN_CHUNK`] ids a statement (SQLite limits the variables of one), all
//! in one read transaction.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, params_from_iter, Connection};

use super::{Device, Devices, DevicesError, Platform};

/// The file under the data directory.
pub const FILE_NAME: &str = "devices.sqlite3";

/// How long a statement waits for a lock held by another connection to the
/// file (another process, or a tool inspecting it).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most user ids bound in one `IN (…)`.
const IN_CHUNK: usize = 500;

pub struct EmbeddedDevices {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS devices (
    token TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    app TEXT,
    locale TEXT,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_user ON devices (user_id, token);
";

/// Columns read back, in [`row_to_device`]'s order.
const COLUMNS: &str = "user_id, platform, token, app, locale, updated_at_ms";

fn unavailable(what: &str, e: impl std::fmt::Display) -> DevicesError {
    DevicesError::Unavailable(format!("{what}: {e}"))
}

/// A row, its platform still text (see [`decode`]).
fn row_to_device(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Device, String)> {
    let platform: String = r.get(1)?;
    Ok((
        Device {
            user_id: r.get(0)?,
            // Replaced by `decode`.
            platform: Platform::Fcm,
            token: r.get(2)?,
            app: r.get(3)?,
            locale: r.get(4)?,
            updated_at_ms: r.get(5)?,
        },
        platform,
    ))
}

/// The device with its platform, logging (and skipping) one whose platform
/// this version does not know.
fn decode((device, platform): (Device, String)) -> Option<Device> {
    match Platform::parse(&platform) {
        Some(platform) => Some(Device { platform, ..device }),
        None => {
            tracing::warn!(
                user = %device.user_id,
                %platform,
                "skipping a device with an unknown platform"
            );
            None
        }
    }
}

/// The statement for `n` user ids.
fn select_sql(n: usize) -> String {
    let marks = vec!["?"; n].join(", ");
    format!("SELECT {COLUMNS} FROM devices WHERE user_id IN ({marks}) ORDER BY user_id, token")
}

impl EmbeddedDevices {
    /// Opens (creating it and `dir` if missing) `dir/devices.sqlite3`.
    pub fn open(dir: &Path) -> Result<Self, DevicesError> {
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
    async fn run<T, F>(&self, what: &'static str, f: F) -> Result<T, DevicesError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // Writes are one statement each, and the read transaction of
            // `devices_of` rolls back when dropped, even by a panic: a
            // panic while the lock was held left nothing open.
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn).map_err(|e| unavailable(what, e))
        })
        .await
        .map_err(|e| unavailable(what, e))?
    }
}

#[async_trait]
impl Devices for EmbeddedDevices {
    async fn register(&self, device: &Device) -> Result<(), DevicesError> {
        let d = device.clone();
        self.run("register device", move |conn| {
            conn.prepare_cached(
                "INSERT INTO devices (token, user_id, platform, app, locale, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (token) DO UPDATE SET
                     user_id = excluded.user_id,
                     platform = excluded.platform,
                     app = excluded.app,
                     locale = excluded.locale,
                     updated_at_ms = excluded.updated_at_ms",
            )?
            .execute(params![
                d.token,
                d.user_id,
                d.platform.as_str(),
                d.app,
                d.locale,
                d.updated_at_ms
            ])
            .map(drop)
        })
        .await
    }

    async fn unregister(&self, token: &str) -> Result<bool, DevicesError> {
        let token = token.to_owned();
        self.run("unregister device", move |conn| {
            conn.prepare_cached("DELETE FROM devices WHERE token = ?1")?
                .execute([&token])
                .map(|n| n > 0)
        })
        .await
    }

    async fn devices_of(&self, user_ids: &[String]) -> Result<Vec<Device>, DevicesError> {
        // Sorted and unique: the chunks then come back in order one after
        // the other, and a user asked twice is listed once.
        let mut ids = user_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .run("list devices", move |conn| {
                // One snapshot across the chunks.
                let tx = conn.unchecked_transaction()?;
                let mut rows = Vec::new();
                for chunk in ids.chunks(IN_CHUNK) {
                    let mut stmt = tx.prepare_cached(&select_sql(chunk.len()))?;
                    for row in stmt.query_map(params_from_iter(chunk), row_to_device)? {
                        rows.push(row?);
                    }
                }
                tx.commit()?;
                Ok(rows)
            })
            .await?;
        Ok(rows.into_iter().filter_map(decode).collect())
    }

    async fn ping(&self) -> Result<(), DevicesError> {
        self.run("ping", |conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded_devices_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedDevices::open(dir.path()).unwrap();
        super::super::conformance::run_all(Arc::new(store)).await;
        assert!(dir.path().join(FILE_NAME).is_file());
    }

    fn device(user: &str, token: &str) -> Device {
        Device {
            user_id: user.into(),
            platform: Platform::Apns,
            token: token.into(),
            app: Some("com.example".into()),
            locale: None,
            updated_at_ms: 42,
        }
    }

    #[tokio::test]
    async fn creates_the_directory_uses_wal_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join("data");
        let kept = device("alice", "tok-1");
        {
            let store = EmbeddedDevices::open(&data).unwrap();
            store.register(&kept).await.unwrap();
            store.register(&device("alice", "tok-2")).await.unwrap();
            assert!(store.unregister("tok-2").await.unwrap());
        }
        let conn = Connection::open(data.join(FILE_NAME)).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(conn);
        let store = EmbeddedDevices::open(&data).unwrap();
        assert_eq!(
            store.devices_of(&["alice".into()]).await.unwrap(),
            vec![kept]
        );
    }

    #[tokio::test]
    async fn unknown_platforms_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedDevices::open(dir.path()).unwrap();
        let known = device("carol", "tok-a");
        store.register(&known).await.unwrap();
        store
            .run("insert", |conn| {
                conn.execute(
                    "INSERT INTO devices (token, user_id, platform, updated_at_ms)
                     VALUES ('tok-b', 'carol', 'webpush', 1)",
                    [],
                )
                .map(drop)
            })
            .await
            .unwrap();
        assert_eq!(
            store.devices_of(&["carol".into()]).await.unwrap(),
            vec![known]
        );
    }

    #[tokio::test]
    async fn a_user_asked_twice_is_listed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedDevices::open(dir.path()).unwrap();
        let d = device("dave", "tok-d");
        store.register(&d).await.unwrap();
        let mut asked: Vec<String> = (0..IN_CHUNK * 2).map(|i| format!("nobody-{i}")).collect();
        asked.insert(0, "dave".into());
        asked.push("dave".into());
        assert_eq!(store.devices_of(&asked).await.unwrap(), vec![d]);
    }

    #[test]
    fn listing_reads_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", select_sql(3)))
            .unwrap()
            .query_map(params!["a", "b", "c"], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("USING INDEX devices_user"), "{plan}");
    }
}
