//! The call log: every call, kept after it ended — parties, devices, type,
//! conversation, times, outcome, duration. One trait, two implementations:
//!
//! - [`MongoCallLog`] (distributed mode): the `calls` collection;
//! - [`EmbeddedCallLog`] (all-in-one): SQLite in WAL mode under `DATA_DIR`.
//!
//! Both pass the [`conformance`] suite. The guarantees callers rely on:
//! - [`CallLog::record`] is an upsert by call id that never goes back: a
//!   record of an earlier stage (ringing < connected < ended) arriving after
//!   a later one changes nothing, so replicas may write in any order;
//!   recording the same stage twice keeps the first (idempotent retries);
//! - [`CallLog::calls_of`] lists the calls a user was caller or callee of,
//!   newest first (`created_at_ms` descending, then id descending), a page
//!   at a time: pass the last call of a page as `before` for the next.

mod embedded;
mod mongo;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

use async_trait::async_trait;

pub use embedded::EmbeddedCallLog;
pub use mongo::MongoCallLog;

use crate::call::Call;

/// Most calls one page returns.
pub const MAX_PAGE: u32 = 100;

/// Where a page starts: strictly older than this call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at_ms: i64,
    pub id: String,
}

impl Cursor {
    pub fn after(call: &Call) -> Self {
        Self {
            created_at_ms: call.created_at_ms,
            id: call.id.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The store cannot be reached or refused the write; the text is for
    /// logs, never for clients.
    #[error("call log unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait CallLog: Send + Sync + 'static {
    /// Stores `call` as it is now (see the module doc: never goes back).
    async fn record(&self, call: &Call) -> Result<(), LogError>;

    /// One call by id.
    async fn call(&self, id: &str) -> Result<Option<Call>, LogError>;

    /// Up to `limit` (at most [`MAX_PAGE`]) calls of `user_id`, newest
    /// first, older than `before` when given.
    async fn calls_of(
        &self,
        user_id: &str,
        before: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<Call>, LogError>;

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), LogError>;
}
