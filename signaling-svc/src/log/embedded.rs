//! The all-in-one call log: SQLite (bundled) in WAL mode, in
//! `DATA_DIR/calls.sqlite3`.
//!
//! One thread owns the connection, so no SQLite call blocks the async
//! runtime. Operations queue to it; it takes all that are waiting (up to
//! [`MAX_BATCH`]) and runs them in ONE transaction, each in a savepoint of
//! its own, then commits once. Every caller hears back after the commit, so
//! nothing is reported stored before it is.
//!
//! `record` is one `INSERT … ON CONFLICT DO UPDATE … WHERE` the new stage
//! is later than the stored one: the never-goes-back rule is a single
//! statement. Socket ids are not stored.

use std::path::Path;
use std::sync::mpsc;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::oneshot;

use super::{CallLog, Cursor, LogError, MAX_PAGE};
use crate::call::{Call, CallStage, CallType, EndReason};

/// Most operations committed together.
const MAX_BATCH: usize = 256;

/// The file under the data directory.
pub const FILE_NAME: &str = "calls.sqlite3";

pub struct EmbeddedCallLog {
    jobs: mpsc::Sender<Box<dyn Work>>,
}

/// Called with the batch's commit result.
type Finish = Box<dyn FnOnce(Result<(), LogError>) + Send>;

/// One queued operation.
trait Work: Send {
    /// Runs inside the batch's transaction, in a savepoint of its own.
    fn run(self: Box<Self>, tx: &mut Transaction<'_>) -> Finish;
    /// The batch could not start.
    fn fail(self: Box<Self>, err: LogError);
}

struct Pending<T, F> {
    what: &'static str,
    f: F,
    reply: oneshot::Sender<Result<T, LogError>>,
}

impl<T, F> Work for Pending<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, LogError> + Send,
{
    fn run(self: Box<Self>, tx: &mut Transaction<'_>) -> Finish {
        let Pending { what, f, reply } = *self;
        let result = match tx.savepoint() {
            // Dropping a savepoint without commit rolls it back.
            Ok(sp) => {
                f(&sp).and_then(|out| sp.commit().map(|()| out).map_err(|e| unavailable(what, e)))
            }
            Err(e) => Err(unavailable(what, e)),
        };
        Box::new(move |committed: Result<(), LogError>| {
            let _ = reply.send(committed.and(result));
        })
    }

    fn fail(self: Box<Self>, err: LogError) {
        let _ = self.reply.send(Err(err));
    }
}

/// The connection's thread: batches queued operations into transactions
/// until the log is dropped.
fn work_loop(mut conn: Connection, jobs: mpsc::Receiver<Box<dyn Work>>) {
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
                let committed = tx.commit().map_err(|e| unavailable("commit", e));
                for finish in finishes {
                    finish(committed.clone());
                }
            }
            Err(e) => {
                let err = unavailable("begin transaction", e);
                for job in batch {
                    job.fail(err.clone());
                }
            }
        }
    }
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY,
    caller_id TEXT NOT NULL,
    caller_device TEXT NOT NULL,
    callee_id TEXT NOT NULL,
    callee_device TEXT NOT NULL,
    call_type TEXT NOT NULL,
    conversation_id TEXT,
    stage TEXT NOT NULL,
    stage_rank INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    answered_at_ms INTEGER,
    ended_at_ms INTEGER,
    end_reason TEXT,
    ended_by TEXT,
    duration_ms INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS calls_caller ON calls (caller_id, created_at_ms DESC, id DESC);
CREATE INDEX IF NOT EXISTS calls_callee ON calls (callee_id, created_at_ms DESC, id DESC);
";

/// Columns read back, in [`row_to_call`]'s order.
const COLUMNS: &str = "id, caller_id, caller_device, callee_id, callee_device, call_type, \
    conversation_id, stage, created_at_ms, answered_at_ms, ended_at_ms, end_reason, ended_by";

const UPSERT: &str = "
INSERT INTO calls (id, caller_id, caller_device, callee_id, callee_device, call_type,
    conversation_id, stage, stage_rank, created_at_ms, answered_at_ms, ended_at_ms,
    end_reason, ended_by, duration_ms)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
ON CONFLICT (id) DO UPDATE SET
    caller_id = excluded.caller_id,
    caller_device = excluded.caller_device,
    callee_id = excluded.callee_id,
    callee_device = excluded.callee_device,
    call_type = excluded.call_type,
    conversation_id = excluded.conversation_id,
    stage = excluded.stage,
    stage_rank = excluded.stage_rank,
    created_at_ms = excluded.created_at_ms,
    answered_at_ms = excluded.answered_at_ms,
    ended_at_ms = excluded.ended_at_ms,
    end_reason = excluded.end_reason,
    ended_by = excluded.ended_by,
    duration_ms = excluded.duration_ms
WHERE excluded.stage_rank > calls.stage_rank
";

fn unavailable(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("{what}: {e}"))
}

/// Orders stages for the never-goes-back rule.
fn stage_rank(stage: CallStage) -> i64 {
    match stage {
        CallStage::Ringing => 0,
        CallStage::Connected => 1,
        CallStage::Ended => 2,
    }
}

/// A stored text column that does not name a known value.
fn bad_value(column: usize, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        column,
        rusqlite::types::Type::Text,
        format!("unknown value {value:?}").into(),
    )
}

fn row_to_call(r: &rusqlite::Row<'_>) -> rusqlite::Result<Call> {
    let call_type: String = r.get(5)?;
    let stage: String = r.get(7)?;
    let end_reason: Option<String> = r.get(11)?;
    Ok(Call {
        id: r.get(0)?,
        caller_id: r.get(1)?,
        caller_device: r.get(2)?,
        caller_conn: String::new(),
        callee_id: r.get(3)?,
        callee_device: r.get(4)?,
        callee_conn: String::new(),
        call_type: CallType::parse(&call_type).ok_or_else(|| bad_value(5, &call_type))?,
        conversation_id: r.get(6)?,
        stage: CallStage::parse(&stage).ok_or_else(|| bad_value(7, &stage))?,
        created_at_ms: r.get(8)?,
        answered_at_ms: r.get(9)?,
        ended_at_ms: r.get(10)?,
        end_reason: match end_reason {
            Some(s) => Some(EndReason::parse(&s).ok_or_else(|| bad_value(11, &s))?),
            None => None,
        },
        ended_by: r.get(12)?,
    })
}

/// The newest `limit` calls `user_id` was caller or callee of, older than
/// `before`. Each side is read through its own index, newest first and
/// limited, and the two are merged (a call to oneself counts once).
fn calls_of(
    conn: &Connection,
    user_id: &str,
    before: Option<&Cursor>,
    limit: i64,
) -> rusqlite::Result<Vec<Call>> {
    let older = if before.is_some() {
        " AND (created_at_ms, id) < (?3, ?4)"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM (
            SELECT * FROM (SELECT {COLUMNS} FROM calls WHERE caller_id = ?1{older}
                ORDER BY created_at_ms DESC, id DESC LIMIT ?2)
            UNION ALL
            SELECT * FROM (SELECT {COLUMNS} FROM calls WHERE callee_id = ?1 AND caller_id <> ?1{older}
                ORDER BY created_at_ms DESC, id DESC LIMIT ?2)
        ) ORDER BY created_at_ms DESC, id DESC LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = match before {
        Some(c) => stmt.query_map(params![user_id, limit, c.created_at_ms, c.id], row_to_call)?,
        None => stmt.query_map(params![user_id, limit], row_to_call)?,
    };
    rows.collect()
}

impl EmbeddedCallLog {
    /// Opens (creating it and `dir` if missing) `dir/calls.sqlite3`.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| unavailable(&format!("create {}", dir.display()), e))?;
        let path = dir.join(FILE_NAME);
        let conn = Connection::open(&path)
            .map_err(|e| unavailable(&format!("open {}", path.display()), e))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| unavailable(&format!("set up {}", path.display()), e))?;
        conn.set_prepared_statement_cache_capacity(16);
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("quckchat-call-log".into())
            .spawn(move || work_loop(conn, queue))
            .map_err(|e| unavailable("start the call log thread", e))?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the connection's thread, atomically; resolves after its
    /// batch committed.
    async fn run<T, F>(&self, what: &'static str, f: F) -> Result<T, LogError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LogError> + Send + 'static,
    {
        let (reply, done) = oneshot::channel();
        let stopped = || unavailable(what, "the call log thread stopped");
        self.jobs
            .send(Box::new(Pending { what, f, reply }))
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

#[async_trait]
impl CallLog for EmbeddedCallLog {
    async fn record(&self, call: &Call) -> Result<(), LogError> {
        let call = call.clone();
        const WHAT: &str = "record call";
        self.run(WHAT, move |conn| {
            let duration = call
                .duration_ms()
                .map(|d| i64::try_from(d).unwrap_or(i64::MAX));
            conn.prepare_cached(UPSERT)
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        call.id,
                        call.caller_id,
                        call.caller_device,
                        call.callee_id,
                        call.callee_device,
                        call.call_type.as_str(),
                        call.conversation_id,
                        call.stage.as_str(),
                        stage_rank(call.stage),
                        call.created_at_ms,
                        call.answered_at_ms,
                        call.ended_at_ms,
                        call.end_reason.map(EndReason::as_str),
                        call.ended_by,
                        duration,
                    ])
                })
                .map_err(|e| unavailable(WHAT, e))?;
            Ok(())
        })
        .await
    }

    async fn call(&self, id: &str) -> Result<Option<Call>, LogError> {
        let id = id.to_owned();
        const WHAT: &str = "read call";
        self.run(WHAT, move |conn| {
            conn.prepare_cached(&format!("SELECT {COLUMNS} FROM calls WHERE id = ?1"))
                .and_then(|mut stmt| stmt.query_row([&id], row_to_call).optional())
                .map_err(|e| unavailable(WHAT, e))
        })
        .await
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
        let (user_id, before) = (user_id.to_owned(), before.cloned());
        const WHAT: &str = "list calls";
        self.run(WHAT, move |conn| {
            calls_of(conn, &user_id, before.as_ref(), i64::from(limit))
                .map_err(|e| unavailable(WHAT, e))
        })
        .await
    }

    async fn ping(&self) -> Result<(), LogError> {
        const WHAT: &str = "ping";
        self.run(WHAT, |conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(|e| unavailable(WHAT, e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::CallType;

    #[tokio::test]
    async fn embedded_call_log_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedCallLog::open(dir.path()).unwrap();
        super::super::conformance::run_all(&log).await;
        assert!(dir.path().join(FILE_NAME).is_file());
    }

    #[tokio::test]
    async fn creates_the_directory_uses_wal_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join("data");
        let call = Call::ringing(
            "c1".into(),
            "a",
            "da",
            "ka",
            "b",
            CallType::Video,
            Some("conv".into()),
            42,
        );
        {
            let log = EmbeddedCallLog::open(&data).unwrap();
            log.record(&call).await.unwrap();
        }
        let conn = Connection::open(data.join(FILE_NAME)).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(conn);
        let log = EmbeddedCallLog::open(&data).unwrap();
        let got = log.call("c1").await.unwrap().unwrap();
        assert_eq!(
            got,
            Call {
                caller_conn: String::new(),
                ..call
            }
        );
    }

    #[test]
    fn listing_reads_through_the_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let sql = format!(
            "EXPLAIN QUERY PLAN SELECT {COLUMNS} FROM calls WHERE caller_id = ?1 \
             AND (created_at_ms, id) < (?2, ?3) ORDER BY created_at_ms DESC, id DESC LIMIT 5"
        );
        let mut stmt = conn.prepare(&sql).unwrap();
        let plan: Vec<String> = stmt
            .query_map(params!["u", 1_i64, "x"], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("calls_caller"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "no sort: {plan}");
    }

    #[test]
    fn an_unusable_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let Err(LogError::Unavailable(msg)) = EmbeddedCallLog::open(&file) else {
            panic!("opening under a file must fail");
        };
        assert!(msg.contains("create"), "{msg}");
    }
}
