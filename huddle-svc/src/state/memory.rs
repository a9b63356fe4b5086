//! Live huddle state in this process (all-in-one).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{RoomState, StateError};
use crate::huddle::Room;

#[derive(Default)]
pub struct MemoryRoomState {
    rooms: Mutex<HashMap<String, Room>>,
}

impl MemoryRoomState {
    pub fn new() -> Self {
        Self::default()
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl RoomState for MemoryRoomState {
    async fn load(&self, huddle_id: &str) -> Result<Room, StateError> {
        Ok(self.rooms().get(huddle_id).cloned().unwrap_or_default())
    }

    async fn commit(&self, huddle_id: &str, room: &Room) -> Result<bool, StateError> {
        let mut rooms = self.rooms();
        let current = rooms.get(huddle_id).map_or(0, |r| r.rev);
        if current + 1 != room.rev {
            return Ok(false);
        }
        rooms.insert(huddle_id.to_owned(), room.clone());
        Ok(true)
    }

    async fn remove(&self, huddle_id: &str) -> Result<(), StateError> {
        self.rooms().remove(huddle_id);
        Ok(())
    }

    async fn due(&self, now_ms: i64) -> Result<Vec<String>, StateError> {
        Ok(self
            .rooms()
            .iter()
            .filter(|(_, r)| r.next_departure().is_some_and(|t| t <= now_ms))
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn live(&self) -> Result<Vec<String>, StateError> {
        Ok(self
            .rooms()
            .iter()
            .filter(|(_, r)| !r.participants.is_empty())
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_room_state_conformance() {
        super::super::conformance::run_all(std::sync::Arc::new(super::MemoryRoomState::new()))
            .await;
    }
}
