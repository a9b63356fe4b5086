//! Live huddle state: each huddle's [`Room`] (participants and versions),
//! shared by every replica. One trait, two implementations: [`RedisRoomState`]
//! (distributed) and [`MemoryRoomState`] (all-in-one), both passing the
//! [`conformance`] suite.
//!
//! The state only loads and stores whole rooms; what a command does to a
//! room is written once, in [`crate::room`]. A commit succeeds only if
//! nobody committed the room since it was loaded (`rev`), so replicas racing
//! on one huddle re-read and decide again, and each event's `version` is
//! given exactly once.

mod memory;
mod redis;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

use async_trait::async_trait;

pub use self::redis::RedisRoomState;
pub use memory::MemoryRoomState;
pub use quckchat_runtime::ephemeral::StateError;

use crate::huddle::Room;

#[async_trait]
pub trait RoomState: Send + Sync + 'static {
    /// The room of a huddle; an empty one (rev 0) when none was stored.
    async fn load(&self, huddle_id: &str) -> Result<Room, StateError>;

    /// Stores `room` if the stored room's rev is still `room.rev - 1` (none
    /// stored counts as 0); false when another commit came first. Also
    /// indexes the huddle as live (it has participants) and by its next
    /// departure.
    async fn commit(&self, huddle_id: &str, room: &Room) -> Result<bool, StateError>;

    /// Forgets a huddle's room (it ended).
    async fn remove(&self, huddle_id: &str) -> Result<(), StateError>;

    /// Huddles with a departure due by `now_ms`.
    async fn due(&self, now_ms: i64) -> Result<Vec<String>, StateError>;

    /// Huddles with participants.
    async fn live(&self) -> Result<Vec<String>, StateError>;

    /// Whether the state answers (readiness).
    async fn ping(&self) -> Result<(), StateError>;
}
