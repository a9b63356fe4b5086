//! Persisted huddles. One trait, two implementations:
//!
//! - [`MongoHuddleStore`] (distributed mode): the `huddles` collection;
//! - [`EmbeddedHuddleStore`] (all-in-one): SQLite under `DATA_DIR`.
//!
//! Both pass the [`conformance`] suite. Participants are not stored here:
//! they are live state ([`crate::state`]).

mod embedded;
mod mongo;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

use async_trait::async_trait;

pub use embedded::EmbeddedHuddleStore;
pub use mongo::MongoHuddleStore;

use crate::huddle::Huddle;

/// Most huddles [`HuddleStore::by_conversation`] returns.
pub const MAX_LISTED: u32 = 100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused the write; the text is for
    /// logs, never for clients.
    #[error("huddle store unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait HuddleStore: Send + Sync + 'static {
    /// Stores a new huddle (its id is fresh; storing the same id twice
    /// keeps the first).
    async fn create(&self, huddle: &Huddle) -> Result<(), StoreError>;

    /// One huddle by id, ended or not.
    async fn get(&self, id: &str) -> Result<Option<Huddle>, StoreError>;

    /// The open huddles of a conversation, oldest first (ties by id), at most `limit`
    /// (capped at [`MAX_LISTED`]).
    async fn by_conversation(
        &self,
        conversation_id: &str,
        limit: u32,
    ) -> Result<Vec<Huddle>, StoreError>;

    /// Ends a huddle at `at_ms`: `Some` with the ended huddle the first
    /// time, `None` if it was already ended or does not exist (exactly one
    /// caller ends it, across replicas).
    async fn end(&self, id: &str, at_ms: i64) -> Result<Option<Huddle>, StoreError>;

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
}
