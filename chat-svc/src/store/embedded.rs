//! The all-in-one store: SQLite (bundled, nothing to install) in WAL mode, in
//! `DATA_DIR/quckchat.db`.
//!
//! One writer thread owns the connection. Operations queue to it; it takes
//! all that are waiting (up to [`MAX_BATCH`]) and runs them in ONE
//! transaction, each inside its own savepoint, then commits once (group
//! commit). An operation that fails rolls back its savepoint only; every
//! caller hears back after the commit, so nothing is reported stored before
//! it is. `seq` has no gap: the counter and the message change together.
//! A second thread checkpoints the WAL into the database file every
//! [`CHECKPOINT_EVERY`] without blocking the writer, so no commit pays for
//! a checkpoint. Those checkpoints never catch up with a writer that never
//! pauses, and SQLite starts the WAL over only once all of it is copied: past
//! [`WAL_RESTART_FRAMES`] the writer itself finishes the copy between two
//! batches (`RESTART`), so the WAL stays bounded under sustained load.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::oneshot;

use super::{
    materialize, now_millis, Appended, ChatStore, Conversation, ConversationSummary, JoinState,
    Message, MessageChange, MessageRef, NewMessage, Page, ReadState, Replay, StoreError, Updated,
};

/// Most operations committed together.
pub const MAX_BATCH: usize = 512;

#[derive(Clone)]
pub struct EmbeddedStore {
    jobs: mpsc::Sender<Box<dyn Work>>,
}

/// Called with the batch's commit result.
type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// One queued operation.
trait Work: Send {
    /// Runs inside the batch's transaction, in a savepoint of its own.
    fn run(self: Box<Self>, tx: &mut Transaction<'_>) -> Finish;
    /// The batch could not start.
    fn fail(self: Box<Self>, err: StoreError);
}

struct Pending<T, F> {
    f: F,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Work for Pending<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(self: Box<Self>, tx: &mut Transaction<'_>) -> Finish {
        let Pending { f, reply } = *self;
        let result = match tx.savepoint() {
            // Dropping a savepoint without commit rolls it back.
            Ok(sp) => f(&sp).and_then(|out| sp.commit().map(|()| out).map_err(unavailable)),
            Err(e) => Err(unavailable(e)),
        };
        Box::new(move |committed: Result<(), StoreError>| {
            let _ = reply.send(committed.and(result));
        })
    }

    fn fail(self: Box<Self>, err: StoreError) {
        let _ = self.reply.send(Err(err));
    }
}

/// How often the checkpointer copies committed WAL frames into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// WAL frames (a page each, ~4 KiB) past which the writer starts the WAL
/// over (~64 MiB). Under a sustained load of small commits the WAL grew by
/// ~100 MB/s without it (each commit writes every page it touched), and a
/// growing file costs the kernel a zeroed page per frame.
const WAL_RESTART_FRAMES: i64 = 16_384;

/// Runs `PRAGMA wal_checkpoint(mode)`: (frames in the WAL, frames copied).
fn checkpoint(conn: &Connection, mode: &str) -> Option<(i64, i64)> {
    match conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    }) {
        Ok(frames) => Some(frames),
        Err(err) => {
            tracing::warn!(%err, mode, "SQLite checkpoint failed");
            None
        }
    }
}

/// How long the writer waits for a lock (rusqlite's default).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// On the writer thread, between batches (every caller so far has its
/// answer): the checkpointer copied most of the WAL a moment ago; copy the
/// rest (what was committed since) and start the WAL over. It waits for no
/// lock: if the checkpointer is copying, or a reader outside this process
/// holds the WAL, it copies what it can and the WAL starts over after a
/// later flag (reads of this store run on this thread, so none of them).
fn restart_wal(conn: &Connection) {
    let _ = conn.busy_timeout(Duration::ZERO);
    checkpoint(conn, "RESTART");
    if let Err(err) = conn.busy_timeout(BUSY_TIMEOUT) {
        tracing::warn!(%err, "SQLite busy timeout not restored");
    }
}

/// Copies the WAL into the database every [`CHECKPOINT_EVERY`] without
/// blocking the writer (`PASSIVE`), and sets `restart_due` when the WAL has
/// grown past `restart_frames`; when the writer thread ends, once more,
/// emptying the WAL (`TRUNCATE`).
fn checkpoint_loop(
    conn: &Connection,
    stop: &mpsc::Receiver<()>,
    restart_frames: i64,
    restart_due: &AtomicBool,
) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Some((frames, _)) = checkpoint(conn, "PASSIVE") {
            if frames >= restart_frames {
                restart_due.store(true, Ordering::Relaxed);
            }
        }
    }
    checkpoint(conn, "TRUNCATE");
}

/// The writer thread: batches queued operations into transactions until
/// every store handle is gone.
fn write_loop(mut conn: Connection, jobs: mpsc::Receiver<Box<dyn Work>>, restart_due: &AtomicBool) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match conn.transaction() {
            Ok(mut tx) => {
                let finishes: Vec<Finish> = batch.into_iter().map(|job| job.run(&mut tx)).collect();
                let committed = tx.commit().map_err(unavailable);
                for finish in finishes {
                    finish(committed.clone());
                }
            }
            Err(e) => {
                let err = unavailable(e);
                for job in batch {
                    job.fail(err.clone());
                }
            }
        }
        if restart_due.swap(false, Ordering::Relaxed) {
            restart_wal(&conn);
        }
    }
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conversation_members (
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    user_id TEXT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX IF NOT EXISTS conversation_members_user ON conversation_members (user_id);
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
    created_version INTEGER NOT NULL,
    version INTEGER NOT NULL,
    UNIQUE (conversation_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_client_message_id
    ON messages (conversation_id, sender_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_version ON messages (conversation_id, version);
CREATE TABLE IF NOT EXISTS read_states (
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    read_up_to INTEGER NOT NULL,
    read_at TEXT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// How long [`EmbeddedStore::open`] waits for another store on the same
/// directory to close (a process still draining while its successor starts).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes `dir/quckchat.lock`: one store per directory. Two would each order
/// their own sends and checkpoint the same WAL. The lock ends with the file
/// (the checkpointer thread holds it), or with the process, however it ends.
fn lock_dir(dir: &Path, wait: Duration) -> Result<std::fs::File, StoreError> {
    let path = dir.join("quckchat.lock");
    let failed = |e: &dyn std::fmt::Display| unavailable(format!("{}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| failed(&e))?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(failed(&format!(
                    "held by another QuckChat store for {wait:?} (one all-in-one or chat-svc per DATA_DIR)"
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(failed(&e)),
        }
    }
}

impl EmbeddedStore {
    /// Opens (creating) `dir/quckchat.db`, waiting up to [`LOCK_WAIT`] for
    /// another store on `dir` to close.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, WAL_RESTART_FRAMES, LOCK_WAIT)
    }

    /// [`Self::open`], starting the WAL over past `restart_frames`.
    fn open_with(dir: &Path, restart_frames: i64, lock_wait: Duration) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        let lock = lock_dir(dir, lock_wait)?;
        let path = dir.join("quckchat.db");
        let conn =
            Connection::open(&path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        conn.set_prepared_statement_cache_capacity(64);
        // Checkpoints run on a thread of their own, so no commit waits for
        // one (SQLite's default runs them inside a commit every 1,000 pages:
        // a few milliseconds added to every message of that batch).
        let checkpointer =
            Connection::open(&path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        let (stop, stopped) = mpsc::channel::<()>();
        let restart_due = Arc::new(AtomicBool::new(false));
        let due = restart_due.clone();
        std::thread::Builder::new()
            .name("quckchat-checkpoint".into())
            .spawn(move || {
                checkpoint_loop(&checkpointer, &stopped, restart_frames, &due);
                // The checkpointer ends last: the directory is free.
                drop(lock);
            })
            .map_err(|e| unavailable(format!("checkpoint thread: {e}")))?;
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .map_err(unavailable)?;
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("quckchat-store".into())
            .spawn(move || {
                write_loop(conn, queue, &restart_due);
                // The last store handle is gone: the checkpointer finishes.
                drop(stop);
            })
            .map_err(|e| unavailable(format!("store thread: {e}")))?;
        Ok(Self { jobs })
    }

    /// Queues `f` to run atomically on the writer thread (now, in call
    /// order); the future resolves after its batch committed.
    fn tx<T, F>(&self, f: F) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, done) = oneshot::channel();
        let stopped = || unavailable("store writer stopped");
        let queued = self
            .jobs
            .send(Box::new(Pending { f, reply }))
            .map_err(|_| stopped());
        async move {
            queued?;
            done.await.map_err(|_| stopped())?
        }
    }
}

/// `execute` through the statement cache: hot statements are parsed once.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// `query_row` through the statement cache.
fn row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

fn read_conversation(conn: &Connection, id: &str) -> Result<Option<Conversation>, StoreError> {
    let last_seq: Option<i64> = row(
        conn,
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
        last_seq: to_u64(last_seq),
    }))
}

fn parse_time(s: Option<String>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn time_text(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(quckchat_runtime::time::iso)
}

const MESSAGE_COLUMNS: &str =
    "id, conversation_id, seq, sender_id, type, content, client_message_id, \
     reply_to, metadata, reactions, created_at, edited_at, deleted_at, created_version, version";

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    let metadata: Option<String> = r.get(8)?;
    let reactions: String = r.get(9)?;
    Ok(Message {
        id: r.get(0)?,
        conversation_id: r.get(1)?,
        seq: to_u64(r.get(2)?),
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
        created_version: to_u64(r.get(13)?),
        version: to_u64(r.get(14)?),
    })
}

/// Messages matching `where_sql` (with `?1` = conversation id), in `order`.
fn select_messages(
    conn: &Connection,
    where_sql: &str,
    params: &[&dyn rusqlite::ToSql],
    order: &str,
    limit: usize,
) -> Result<Vec<Message>, StoreError> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE {where_sql} ORDER BY {order} LIMIT {limit}"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
    let rows = stmt
        .query_map(params, row_to_message)
        .map_err(unavailable)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
}

fn find_message(
    conn: &Connection,
    conversation_id: &str,
    which: &MessageRef,
) -> Result<Option<Message>, StoreError> {
    let found = match which {
        MessageRef::Id(id) => select_messages(
            conn,
            "conversation_id = ?1 AND id = ?2",
            params![conversation_id, id],
            "seq",
            1,
        )?,
        MessageRef::Seq(seq) => select_messages(
            conn,
            "conversation_id = ?1 AND seq = ?2",
            params![conversation_id, to_i64(*seq)],
            "seq",
            1,
        )?,
    };
    Ok(found.into_iter().next())
}

/// Takes the conversation's next version (and next seq when `new_message`).
fn bump(
    tx: &Connection,
    conversation_id: &str,
    new_message: bool,
) -> Result<(u64, u64), StoreError> {
    let sql = if new_message {
        "UPDATE conversations SET last_seq = last_seq + 1, version = version + 1 WHERE id = ?1 RETURNING last_seq, version"
    } else {
        "UPDATE conversations SET version = version + 1 WHERE id = ?1 RETURNING last_seq, version"
    };
    let row: Option<(i64, i64)> = row(tx, sql, [conversation_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(unavailable)?;
    let (seq, version) = row.ok_or(StoreError::ConversationNotFound)?;
    Ok((to_u64(seq), to_u64(version)))
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
        self.tx(move |tx| {
            exec(tx, "INSERT INTO conversations (id) VALUES (?1) ON CONFLICT (id) DO NOTHING", [&id])
                .map_err(unavailable)?;
            exec(tx, "DELETE FROM conversation_members WHERE conversation_id = ?1", [&id])
                .map_err(unavailable)?;
            for m in &members {
                exec(
                    tx,
                    "INSERT OR IGNORE INTO conversation_members (conversation_id, user_id) VALUES (?1, ?2)",
                    params![id, m],
                )
                .map_err(unavailable)?;
            }
            read_conversation(tx, &id)?.ok_or(StoreError::ConversationNotFound)
        })
        .await
    }

    async fn remove_member(&self, id: &str, user_id: &str) -> Result<Conversation, StoreError> {
        let (id, user_id) = (id.to_owned(), user_id.to_owned());
        self.tx(move |tx| {
            exec(
                tx,
                "DELETE FROM conversation_members WHERE conversation_id = ?1 AND user_id = ?2",
                params![id, user_id],
            )
            .map_err(unavailable)?;
            read_conversation(tx, &id)?.ok_or(StoreError::ConversationNotFound)
        })
        .await
    }

    async fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let id = id.to_owned();
        self.tx(move |tx| read_conversation(tx, &id)).await
    }

    async fn conversations_of(
        &self,
        user_id: &str,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        let user_id = user_id.to_owned();
        self.tx(move |tx| {
            // Counting a conversation's members walks its primary-key range
            // only: no member row is read into memory.
            let mut stmt = tx
                .prepare_cached(
                    "SELECT c.id, c.last_seq, \
                     (SELECT COUNT(*) FROM conversation_members n WHERE n.conversation_id = c.id) \
                     FROM conversation_members m JOIN conversations c ON c.id = m.conversation_id \
                     WHERE m.user_id = ?1 ORDER BY c.id",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([&user_id], |r| {
                    Ok(ConversationSummary {
                        id: r.get(0)?,
                        last_seq: to_u64(r.get(1)?),
                        members: to_u64(r.get(2)?),
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }

    async fn join_state(
        &self,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<Option<JoinState>, StoreError> {
        let (conversation_id, user_id) = (conversation_id.to_owned(), user_id.to_owned());
        self.tx(move |tx| {
            row(
                tx,
                "SELECT c.last_seq, COALESCE(r.read_up_to, 0) FROM conversations c \
                 JOIN conversation_members m ON m.conversation_id = c.id AND m.user_id = ?2 \
                 LEFT JOIN read_states r ON r.conversation_id = c.id AND r.user_id = ?2 \
                 WHERE c.id = ?1",
                params![conversation_id, user_id],
                |r| {
                    Ok(JoinState {
                        last_seq: to_u64(r.get(0)?),
                        read_up_to: to_u64(r.get(1)?),
                    })
                },
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    fn append_message(&self, new: NewMessage) -> BoxFuture<'static, Result<Appended, StoreError>> {
        // Queued at once: the writer thread takes appends in call order.
        Box::pin(self.tx(move |tx| {
            if let Some(cmid) = &new.client_message_id {
                let existing = select_messages(
                    tx,
                    "conversation_id = ?1 AND sender_id = ?2 AND client_message_id = ?3",
                    params![new.conversation_id, new.sender_id, cmid],
                    "seq",
                    1,
                )?;
                if let Some(message) = existing.into_iter().next() {
                    return Ok(Appended {
                        message,
                        created: false,
                    });
                }
            }
            let (seq, version) = bump(tx, &new.conversation_id, true)?;
            let m = materialize(new, seq, version);
            exec(
                tx,
                &format!(
                    "INSERT INTO messages ({MESSAGE_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, '{{}}', ?10, NULL, NULL, ?11, ?11)"
                ),
                params![
                    m.id,
                    m.conversation_id,
                    to_i64(m.seq),
                    m.sender_id,
                    m.kind,
                    m.content,
                    m.client_message_id,
                    m.reply_to,
                    m.metadata
                        .as_ref()
                        .map(|v| serde_json::Value::Object(v.clone()).to_string()),
                    quckchat_runtime::time::iso(m.created_at),
                    to_i64(version),
                ],
            )
            .map_err(unavailable)?;
            Ok(Appended {
                message: m,
                created: true,
            })
        }))
    }

    async fn message(
        &self,
        conversation_id: &str,
        which: &MessageRef,
    ) -> Result<Option<Message>, StoreError> {
        let (conversation_id, which) = (conversation_id.to_owned(), which.clone());
        self.tx(move |tx| find_message(tx, &conversation_id, &which))
            .await
    }

    async fn update_message(
        &self,
        conversation_id: &str,
        message_id: &str,
        change: &MessageChange,
    ) -> Result<Updated, StoreError> {
        let (conversation_id, message_id, change) = (
            conversation_id.to_owned(),
            message_id.to_owned(),
            change.clone(),
        );
        self.tx(move |tx| {
            let mut m = find_message(tx, &conversation_id, &MessageRef::Id(message_id))?
                .ok_or(StoreError::MessageNotFound)?;
            if !change.apply(&mut m, now_millis())? {
                return Ok(Updated { message: m, changed: false });
            }
            let (_, version) = bump(tx, &conversation_id, false)?;
            m.version = version;
            exec(
                tx,
                "UPDATE messages SET content = ?1, metadata = ?2, reactions = ?3, edited_at = ?4, deleted_at = ?5, \
                 version = ?6 WHERE id = ?7",
                params![
                    m.content,
                    m.metadata.as_ref().map(|v| serde_json::Value::Object(v.clone()).to_string()),
                    serde_json::to_string(&m.reactions).map_err(unavailable)?,
                    time_text(m.edited_at),
                    time_text(m.deleted_at),
                    to_i64(version),
                    m.id,
                ],
            )
            .map_err(unavailable)?;
            Ok(Updated { message: m, changed: true })
        })
        .await
    }

    async fn history(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let conversation_id = conversation_id.to_owned();
        self.tx(move |tx| {
            let before = to_i64(before_seq.unwrap_or(u64::MAX));
            let newest_first = select_messages(
                tx,
                "conversation_id = ?1 AND seq < ?2",
                params![conversation_id, before],
                "seq DESC",
                limit + 1,
            )?;
            Ok(Page::from_newest_first(newest_first, limit))
        })
        .await
    }

    async fn changes_since(
        &self,
        conversation_id: &str,
        last_seq: u64,
        max: usize,
    ) -> Result<Replay, StoreError> {
        let conversation_id = conversation_id.to_owned();
        self.tx(move |tx| {
            let new = select_messages(
                tx,
                "conversation_id = ?1 AND seq > ?2",
                params![conversation_id, to_i64(last_seq)],
                "seq DESC",
                max + 1,
            )?;
            // Changed since the client's last message was created; a lastSeq
            // naming no message (0, or from another database) has none.
            let seen = find_message(tx, &conversation_id, &MessageRef::Seq(last_seq))?;
            let changed = match seen {
                None => Vec::new(),
                Some(seen) => select_messages(
                    tx,
                    "conversation_id = ?1 AND seq <= ?2 AND version > ?3",
                    params![
                        conversation_id,
                        to_i64(last_seq),
                        to_i64(seen.created_version)
                    ],
                    "seq",
                    max + 1,
                )?,
            };
            Ok(Replay::bounded(new, changed, max))
        })
        .await
    }

    async fn mark_read(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
    ) -> Result<ReadState, StoreError> {
        let (conversation_id, user_id) = (conversation_id.to_owned(), user_id.to_owned());
        self.tx(move |tx| {
            let advanced = exec(
                    tx,
                    "INSERT INTO read_states (conversation_id, user_id, read_up_to, read_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (conversation_id, user_id) DO UPDATE \
                     SET read_up_to = excluded.read_up_to, read_at = excluded.read_at \
                     WHERE excluded.read_up_to > read_states.read_up_to",
                    params![conversation_id, user_id, to_i64(seq), quckchat_runtime::time::iso(now_millis())],
                )
                .map_err(unavailable)?
                > 0;
            let read_up_to: i64 = row(
                    tx,
                    "SELECT read_up_to FROM read_states WHERE conversation_id = ?1 AND user_id = ?2",
                    params![conversation_id, user_id],
                    |r| r.get(0),
                )
                .map_err(unavailable)?;
            Ok(ReadState { read_up_to: to_u64(read_up_to), advanced })
        })
        .await
    }

    async fn read_up_to(&self, conversation_id: &str, user_id: &str) -> Result<u64, StoreError> {
        let (conversation_id, user_id) = (conversation_id.to_owned(), user_id.to_owned());
        self.tx(move |tx| {
            let v: Option<i64> = row(
                tx,
                "SELECT read_up_to FROM read_states WHERE conversation_id = ?1 AND user_id = ?2",
                params![conversation_id, user_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)?;
            Ok(v.map_or(0, to_u64))
        })
        .await
    }

    async fn unread_count(&self, conversation_id: &str, user_id: &str) -> Result<u64, StoreError> {
        let (conversation_id, user_id) = (conversation_id.to_owned(), user_id.to_owned());
        self.tx(move |tx| {
            let n: i64 = row(
                    tx,
                    "SELECT COUNT(*) FROM messages WHERE conversation_id = ?1 AND sender_id != ?2 AND deleted_at IS NULL \
                     AND seq > COALESCE((SELECT read_up_to FROM read_states WHERE conversation_id = ?1 AND user_id = ?2), 0)",
                    params![conversation_id, user_id],
                    |r| r.get(0),
                )
                .map_err(unavailable)?;
            Ok(to_u64(n))
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.tx(|tx| {
            tx.query_row("SELECT 1", [], |_| Ok(()))
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
        super::super::conformance::run_all(std::sync::Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_in_a_batch_leaves_the_others_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.upsert_conversation("c", &["a".into()]).await.unwrap();
        let writes: Vec<_> = (0..50)
            .map(|i| {
                let store = store.clone();
                let conversation = if i % 5 == 0 { "missing" } else { "c" };
                let new =
                    super::super::conformance::text(conversation, "a", &format!("m{i}"), None);
                tokio::spawn(async move { store.append_message(new).await })
            })
            .collect();
        let (mut seqs, mut refused) = (Vec::new(), 0);
        for w in writes {
            match w.await.unwrap() {
                Ok(a) => seqs.push(a.message.seq),
                Err(StoreError::ConversationNotFound) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        seqs.sort_unstable();
        assert_eq!(refused, 10);
        assert_eq!(
            seqs,
            (1..=40).collect::<Vec<_>>(),
            "gap-free despite failures in the same batches"
        );
        assert_eq!(store.conversation("c").await.unwrap().unwrap().last_seq, 40);
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

    /// (WAL frames, frames checkpointed) as a fresh connection sees them.
    fn wal_frames(path: &Path) -> (i64, i64) {
        let conn = Connection::open(path).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
        .unwrap()
    }

    /// The WAL header's checkpoint sequence number: SQLite adds one each
    /// time the WAL starts over.
    fn wal_restarts(wal: &Path) -> u32 {
        let header = std::fs::read(wal).unwrap();
        u32::from_be_bytes(header[12..16].try_into().unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_that_never_pauses_still_starts_the_wal_over() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("quckchat.db");
        let wal = dir.path().join("quckchat.db-wal");
        let store = EmbeddedStore::open_with(dir.path(), 64, LOCK_WAIT).unwrap();
        store.upsert_conversation("c", &["a".into()]).await.unwrap();
        let before = wal_restarts(&wal);
        // Sixteen senders keep the writer busy for three checkpoint periods:
        // the checkpointer's copies never catch up with it by themselves.
        let until = Instant::now() + CHECKPOINT_EVERY * 3;
        let mut senders = tokio::task::JoinSet::new();
        for s in 0..16 {
            let store = store.clone();
            senders.spawn(async move {
                let mut sent = 0;
                while Instant::now() < until {
                    let text = format!("s{s}-{sent}");
                    let new = super::super::conformance::text("c", "a", &text, None);
                    store.append_message(new).await.unwrap();
                    sent += 1;
                }
                sent
            });
        }
        let sent: i64 = senders.join_all().await.into_iter().sum();
        let after = wal_restarts(&wal);
        assert!(
            after > before,
            "the WAL never started over ({sent} messages; checkpoint sequence {before} -> {after})"
        );
        // Nothing committed was lost by starting over.
        assert_eq!(
            store.conversation("c").await.unwrap().unwrap().last_seq,
            sent as u64
        );
        drop(store);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n: Result<i64, _> = Connection::open(&db)
                .and_then(|c| c.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0)));
            if n.as_ref().is_ok_and(|n| *n == sent) {
                break;
            }
            assert!(Instant::now() < deadline, "{n:?} messages of {sent}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_outside_the_process_does_not_stall_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with(dir.path(), 64, LOCK_WAIT).unwrap();
        store.upsert_conversation("c", &["a".into()]).await.unwrap();
        // Another process (a backup, the sqlite3 shell) holds a snapshot of
        // the WAL: the restart cannot start it over, and must not wait.
        let reader = Connection::open(dir.path().join("quckchat.db")).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        let until = Instant::now() + CHECKPOINT_EVERY * 3;
        let mut slowest = Duration::ZERO;
        let mut i = 0;
        while Instant::now() < until {
            let new = super::super::conformance::text("c", "a", &format!("m{i}"), None);
            let started = Instant::now();
            store.append_message(new).await.unwrap();
            slowest = slowest.max(started.elapsed());
            i += 1;
        }
        assert!(
            slowest < Duration::from_secs(1),
            "an append waited {slowest:?} behind the WAL restart"
        );
        reader.execute_batch("COMMIT").unwrap();
    }

    #[tokio::test]
    async fn one_store_per_directory_the_next_opens_once_the_first_closed() {
        let dir = tempfile::tempdir().unwrap();
        let first = EmbeddedStore::open(dir.path()).unwrap();
        first.upsert_conversation("c", &["a".into()]).await.unwrap();
        let wait = Duration::from_millis(300);
        let refused = EmbeddedStore::open_with(dir.path(), WAL_RESTART_FRAMES, wait)
            .err()
            .expect("a second store on the same directory");
        assert!(
            refused.to_string().contains("per DATA_DIR"),
            "the error says why: {refused}"
        );
        // The first one closes while the next waits for it.
        let path = dir.path().to_owned();
        let next = std::thread::spawn(move || EmbeddedStore::open(&path));
        tokio::time::sleep(wait).await;
        drop(first);
        let next = next.join().unwrap().expect("opened once the first closed");
        assert_eq!(
            next.conversation("c").await.unwrap().unwrap().member_ids,
            vec!["a"]
        );
    }

    #[tokio::test]
    async fn checkpoints_run_beside_the_writer_and_empty_the_wal_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("quckchat.db");
        let wal = dir.path().join("quckchat.db-wal");
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.upsert_conversation("c", &["a".into()]).await.unwrap();
        for i in 0..300 {
            let new = super::super::conformance::text("c", "a", &format!("m{i}"), None);
            store.append_message(new).await.unwrap();
        }
        // Commits never checkpoint; the checkpointer catches up within its period.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            tokio::time::sleep(CHECKPOINT_EVERY).await;
            let (frames, copied) = wal_frames(&db);
            if frames > 0 && frames == copied {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "WAL not checkpointed: {frames} frames, {copied} copied"
            );
        }
        drop(store);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Emptied, or removed once the last connection closed.
        while std::fs::metadata(&wal).map_or(0, |m| m.len()) > 0 {
            assert!(
                Instant::now() < deadline,
                "WAL not emptied after the last handle went"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let conn = Connection::open(&db).unwrap();
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 300);
    }
}
