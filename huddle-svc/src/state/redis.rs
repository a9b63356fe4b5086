//! Live huddle state in Redis (distributed mode), shared by every replica.
//!
//! Keys (under the pool's prefix `p`):
//! - `p:huddle:<id>`: a hash `{rev, room: the room as JSON}`;
//! - `p:huddle-due`: a sorted set of huddle ids scored by their next
//!   departure (Unix ms);
//! - `p:huddle-live`: the set of huddles with participants.
//!
//! A commit is one Lua script checking `rev`, so replicas racing on one
//! huddle cannot both win.

use async_trait::async_trait;
use quckchat_runtime::ephemeral::{redis, RedisPool, Script};

use super::{RoomState, StateError};
use crate::huddle::Room;

const COMMIT: &str = r"
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev + 1 ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'rev', ARGV[1], 'room', ARGV[2])
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[2], ARGV[5])
else
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
end
if ARGV[4] == '1' then
  redis.call('SADD', KEYS[3], ARGV[5])
else
  redis.call('SREM', KEYS[3], ARGV[5])
end
return 1
";

pub struct RedisRoomState {
    redis: RedisPool,
    commit: Script,
}

impl RedisRoomState {
    /// Connects to `url`; every key lives under `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StateError> {
        Ok(Self::new(RedisPool::connect(url, prefix).await?))
    }

    pub fn new(redis: RedisPool) -> Self {
        Self {
            redis,
            commit: Script::new("huddle_commit", COMMIT),
        }
    }

    pub fn pool(&self) -> &RedisPool {
        &self.redis
    }

    fn room_key(&self, id: &str) -> String {
        self.redis.key(&["huddle", id])
    }
}

#[async_trait]
impl RoomState for RedisRoomState {
    async fn load(&self, huddle_id: &str) -> Result<Room, StateError> {
        let json: Option<String> = self
            .redis
            .query(redis::cmd("HGET").arg(self.room_key(huddle_id)).arg("room"))
            .await?;
        match json {
            None => Ok(Room::default()),
            Some(json) => serde_json::from_str(&json).map_err(|e| {
                StateError::Malformed(format!(
                    "huddle room: {:?} error at column {}",
                    e.classify(),
                    e.column()
                ))
            }),
        }
    }

    async fn commit(&self, huddle_id: &str, room: &Room) -> Result<bool, StateError> {
        let json = serde_json::to_string(room)
            .map_err(|e| StateError::Malformed(format!("huddle room not encoded: {e}")))?;
        let due = room
            .next_departure()
            .map(|t| t.to_string())
            .unwrap_or_default();
        let live = if room.participants.is_empty() {
            "0"
        } else {
            "1"
        };
        let applied: i64 = self
            .commit
            .call()
            .key(self.room_key(huddle_id))
            .key(self.redis.key(&["huddle-due"]))
            .key(self.redis.key(&["huddle-live"]))
            .arg(room.rev)
            .arg(json)
            .arg(due)
            .arg(live)
            .arg(huddle_id)
            .run(&self.redis)
            .await?;
        Ok(applied == 1)
    }

    async fn remove(&self, huddle_id: &str) -> Result<(), StateError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(self.room_key(huddle_id))
            .cmd("ZREM")
            .arg(self.redis.key(&["huddle-due"]))
            .arg(huddle_id)
            .cmd("SREM")
            .arg(self.redis.key(&["huddle-live"]))
            .arg(huddle_id);
        self.redis.pipeline::<()>(&pipe).await
    }

    async fn due(&self, now_ms: i64) -> Result<Vec<String>, StateError> {
        self.redis
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.redis.key(&["huddle-due"]))
                    .arg("-inf")
                    .arg(now_ms)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(500),
            )
            .await
    }

    async fn live(&self) -> Result<Vec<String>, StateError> {
        self.redis
            .query(redis::cmd("SMEMBERS").arg(self.redis.key(&["huddle-live"])))
            .await
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.redis.ping().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use quckchat_runtime::testkit::{redis_url, unique};

    use super::*;

    #[tokio::test]
    async fn redis_room_state_conformance() {
        let prefix = unique("huddles");
        let state = RedisRoomState::connect(&redis_url(), &prefix)
            .await
            .expect("Redis must be reachable at REDIS_URL (scripts/deps.sh starts it)");
        let pool = state.pool().clone();
        super::super::conformance::run_all(Arc::new(state)).await;
        pool.clear().await.unwrap();
    }
}
