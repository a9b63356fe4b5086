//! Call state in Redis (distributed mode), shared by every replica.
//!
//! Keys (under the pool's prefix `p`):
//! - `p:call:<id>`: a hash `{v: version, stage, data: the call as JSON}`;
//!   an ended call expires after [`ENDED_RETENTION`];
//! - `p:user:<userId>`: the id of the call the user is in (removed when it
//!   ends);
//! - `p:call-timers`: a sorted set of [`Timer::member`]s scored by due time.
//!
//! A commit is one Lua script: it checks the version and that every claimed
//! user is free, then writes the call, the users and the timers, so
//! replicas racing on one call cannot both win.

use async_trait::async_trait;
use quckchat_runtime::ephemeral::{redis, RedisPool, Script};

use super::{CallState, Commit, StateError, Timer, Versioned, ENDED_RETENTION};
use crate::call::{Call, CallStage};

const COMMIT: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if v then return 0 end
elseif v ~= ARGV[1] then
  return 0
end
local id, p = ARGV[4], ARGV[5]
local i = 9
local n = tonumber(ARGV[i])
for j = 1, n do
  local cur = redis.call('GET', p .. ':user:' .. ARGV[i + j])
  if cur and cur ~= id then
    local stage = redis.call('HGET', p .. ':call:' .. cur, 'stage')
    if stage and stage ~= 'ended' then return 0 end
  end
end
for j = 1, n do
  redis.call('SET', p .. ':user:' .. ARGV[i + j], id)
end
i = i + n + 1
n = tonumber(ARGV[i])
for j = 1, n do
  redis.call('ZREM', KEYS[2], ARGV[i + j])
end
i = i + n + 1
n = tonumber(ARGV[i])
for j = 0, n - 1 do
  redis.call('ZADD', KEYS[2], ARGV[i + 2 + 2 * j], ARGV[i + 1 + 2 * j])
end
redis.call('HSET', KEYS[1], 'v', (tonumber(v) or 0) + 1, 'stage', ARGV[3], 'data', ARGV[2])
if ARGV[3] == 'ended' then
  for _, u in ipairs({ARGV[7], ARGV[8]}) do
    local k = p .. ':user:' .. u
    if redis.call('GET', k) == id then redis.call('DEL', k) end
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
else
  redis.call('PERSIST', KEYS[1])
end
return 1
";

/// [`super::CallState`] in Redis.
pub struct RedisCallState {
    redis: RedisPool,
    commit: Script,
}

impl RedisCallState {
    /// Connects to `url`; every key lives under `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StateError> {
        Ok(Self::new(RedisPool::connect(url, prefix).await?))
    }

    pub fn new(redis: RedisPool) -> Self {
        Self {
            redis,
            commit: Script::new("call_commit", COMMIT),
        }
    }

    pub fn pool(&self) -> &RedisPool {
        &self.redis
    }

    fn call_key(&self, id: &str) -> String {
        self.redis.key(&["call", id])
    }

    fn timers_key(&self) -> String {
        self.redis.key(&["call-timers"])
    }
}

fn malformed(what: &str) -> StateError {
    StateError::Malformed(format!("call state: {what}"))
}

#[async_trait]
impl CallState for RedisCallState {
    async fn load(&self, call_id: &str) -> Result<Option<Versioned>, StateError> {
        let (version, data): (Option<u64>, Option<String>) = self
            .redis
            .query(
                redis::cmd("HMGET")
                    .arg(self.call_key(call_id))
                    .arg("v")
                    .arg("data"),
            )
            .await?;
        match (version, data) {
            (Some(version), Some(data)) => {
                let call: Call = serde_json::from_str(&data)
                    .map_err(|_| malformed("a stored call does not parse"))?;
                Ok(Some(Versioned { call, version }))
            }
            (None, None) => Ok(None),
            _ => Err(malformed("a call without its version or data")),
        }
    }

    async fn active_call_id(&self, user_id: &str) -> Result<Option<String>, StateError> {
        let id: Option<String> = self
            .redis
            .query(redis::cmd("GET").arg(self.redis.key(&["user", user_id])))
            .await?;
        let Some(id) = id else { return Ok(None) };
        let stage: Option<String> = self
            .redis
            .query(redis::cmd("HGET").arg(self.call_key(&id)).arg("stage"))
            .await?;
        Ok(stage
            .filter(|s| CallStage::parse(s).is_some_and(|s| s != CallStage::Ended))
            .map(|_| id))
    }

    async fn commit(&self, commit: &Commit) -> Result<bool, StateError> {
        let call = &commit.call;
        let data = serde_json::to_string(call).map_err(|_| malformed("a call does not encode"))?;
        let retention = u64::try_from(ENDED_RETENTION.as_millis()).unwrap_or(u64::MAX);
        let mut run = self
            .commit
            .call()
            .key(self.call_key(&call.id))
            .key(self.timers_key())
            .arg(commit.expect.map(|v| v.to_string()).unwrap_or_default())
            .arg(data)
            .arg(call.stage.as_str())
            .arg(&call.id)
            .arg(self.redis.prefix())
            .arg(retention)
            .arg(&call.caller_id)
            .arg(&call.callee_id)
            .arg(commit.claim.len());
        for user in &commit.claim {
            run = run.arg(user);
        }
        run = run.arg(commit.clear_timers.len());
        for timer in &commit.clear_timers {
            run = run.arg(timer.member(&call.id));
        }
        run = run.arg(commit.set_timers.len());
        for (timer, due) in &commit.set_timers {
            run = run.arg(timer.member(&call.id)).arg(*due);
        }
        let applied: i64 = run.run(&self.redis).await?;
        Ok(applied == 1)
    }

    async fn due_timers(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, Timer)>, StateError> {
        let members: Vec<String> = self
            .redis
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.timers_key())
                    .arg("-inf")
                    .arg(now_ms)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        Ok(members
            .iter()
            .filter_map(|m| Timer::parse_member(m))
            .collect())
    }

    async fn drop_timer(&self, call_id: &str, timer: Timer) -> Result<(), StateError> {
        self.redis
            .query::<i64>(
                redis::cmd("ZREM")
                    .arg(self.timers_key())
                    .arg(timer.member(call_id)),
            )
            .await
            .map(|_| ())
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
    async fn redis_call_state_conformance() {
        let prefix = unique("calls");
        let state = RedisCallState::connect(&redis_url(), &prefix)
            .await
            .expect("Redis must be reachable at REDIS_URL (scripts/deps.sh starts it)");
        let pool = state.pool().clone();
        super::super::conformance::run_all(Arc::new(state), "r-").await;
        // Ended calls expire; live keys are gone: only ended calls remain.
        let keys: Vec<String> = pool
            .query(redis::cmd("KEYS").arg(format!("{prefix}:*")))
            .await
            .unwrap();
        assert!(
            keys.iter()
                .all(|k| k.starts_with(&format!("{prefix}:call:"))),
            "{keys:?}"
        );
        for key in &keys {
            let ttl: i64 = pool.query(redis::cmd("PTTL").arg(key)).await.unwrap();
            assert!(ttl > 0, "{key} has no expiry");
        }
        pool.clear().await.unwrap();
    }
}
