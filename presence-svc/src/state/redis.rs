//! Presence state in Redis (deadpool-redis), shared by every presence
//! replica. Each operation is one Lua script, so it is atomic however many
//! replicas handle events at once; a presence query for many users is one
//! pipelined round trip.
//!
//! Keys, under a prefix (`REDIS_KEY_PREFIX`, so environments and tests can
//! share a Redis), ids being `[A-Za-z0-9_-]`:
//! - `<p>:devices:<user>` HASH device → meta JSON
//! - `<p>:conns:<user>:<device>` SET of connection ids
//! - `<p>:node:<node>` SET of `user|device|conn`
//! - `<p>:nodes` ZSET node → last heartbeat (ms)
//! - `<p>:pending` ZSET `user|device` → when it leaves (ms)
//! - `<p>:lastseen` HASH user → ms
//! - `<p>:closed:<conn>` a closed connection, kept 10 minutes
//!
//! Scripts build keys from the prefix, so this targets a single Redis (or
//! one cluster slot), not a sharded cluster.

use async_trait::async_trait;
use deadpool_redis::redis::{self, Script};
use deadpool_redis::{Config, Pool, Runtime};

use super::{Connection, DeviceMeta, Joined, Left, PresenceState, StateError, UserPresence};

/// Shared by the scripts: closes one connection; schedules its device's
/// leave when it was the device's last.
const CLOSE_FN: &str = r"
local function close(p, node, user, dev, conn, leave_at)
  redis.call('SET', p..':closed:'..conn, '1', 'EX', 600)
  redis.call('SREM', p..':node:'..node, user..'|'..dev..'|'..conn)
  local ck = p..':conns:'..user..':'..dev
  redis.call('SREM', ck, conn)
  if redis.call('SCARD', ck) == 0 and redis.call('HEXISTS', p..':devices:'..user, dev) == 1 then
    local key = user..'|'..dev
    local cur = redis.call('ZSCORE', p..':pending', key)
    if (not cur) or tonumber(cur) > leave_at then
      redis.call('ZADD', p..':pending', leave_at, key)
    end
  end
end
local function drop_node(p, node, leave_at)
  for _, m in ipairs(redis.call('SMEMBERS', p..':node:'..node)) do
    local user, dev, conn = string.match(m, '^([^|]*)|([^|]*)|(.*)$')
    close(p, node, user, dev, conn, leave_at)
  end
  redis.call('DEL', p..':node:'..node)
  redis.call('ZREM', p..':nodes', node)
end
";

const CONNECT: &str = r#"
local p, node, user, dev, conn, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', p..':closed:'..conn) == 1 then return {0} end
redis.call('ZADD', p..':nodes', now, node)
redis.call('SADD', p..':node:'..node, user..'|'..dev..'|'..conn)
redis.call('SADD', p..':conns:'..user..':'..dev, conn)
redis.call('ZREM', p..':pending', user..'|'..dev)
local devkey = p..':devices:'..user
if redis.call('HEXISTS', devkey, dev) == 1 then return {1} end
local first = redis.call('HLEN', devkey) == 0
local meta = '{"device_id":"'..dev..'","phx_ref":"'..conn..'","online_at_ms":'..now..'}'
redis.call('HSET', devkey, dev, meta)
if first then return {2, meta, 1} end
return {2, meta, 0}
"#;

const DISCONNECT: &str = r"
close(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]))
return 1
";

const NODE_GONE: &str = r"
drop_node(ARGV[1], ARGV[2], tonumber(ARGV[3]))
return 1
";

const EXPIRE_NODES: &str = r"
local p, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local dead = redis.call('ZRANGEBYSCORE', p..':nodes', '-inf', '('..(now - ttl))
for _, node in ipairs(dead) do drop_node(p, node, now) end
return #dead
";

const TAKE_DEPARTURES: &str = r"
local p, now = ARGV[1], ARGV[2]
local out = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', p..':pending', '-inf', now, 'LIMIT', 0, 500)) do
  redis.call('ZREM', p..':pending', key)
  local user, dev = string.match(key, '^([^|]*)|(.*)$')
  if redis.call('SCARD', p..':conns:'..user..':'..dev) == 0 then
    local devkey = p..':devices:'..user
    local meta = redis.call('HGET', devkey, dev)
    if meta then
      redis.call('HDEL', devkey, dev)
      local offline = 0
      if redis.call('HLEN', devkey) == 0 then
        offline = 1
        redis.call('HSET', p..':lastseen', user, now)
      end
      table.insert(out, user)
      table.insert(out, meta)
      table.insert(out, offline)
    end
  end
end
return out
";

pub struct RedisState {
    pool: Pool,
    prefix: String,
    connect: Script,
    disconnect: Script,
    node_gone: Script,
    expire_nodes: Script,
    take_departures: Script,
}

fn unavailable(e: impl std::fmt::Display) -> StateError {
    StateError(e.to_string())
}

fn meta_from(json: &str) -> Result<DeviceMeta, StateError> {
    serde_json::from_str(json).map_err(|e| unavailable(format!("bad device meta {json:?}: {e}")))
}

impl RedisState {
    /// Connects to `url` and checks Redis answers. `prefix` namespaces keys.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StateError> {
        let pool = Config::from_url(url)
            .create_pool(Some(Runtime::Tokio1))
            .map_err(unavailable)?;
        let with_fns = |body: &str| Script::new(&format!("{CLOSE_FN}\n{body}"));
        let state = Self {
            pool,
            prefix: prefix.to_owned(),
            connect: Script::new(CONNECT),
            disconnect: with_fns(DISCONNECT),
            node_gone: with_fns(NODE_GONE),
            expire_nodes: with_fns(EXPIRE_NODES),
            take_departures: Script::new(TAKE_DEPARTURES),
        };
        state.ping().await?;
        Ok(state)
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, StateError> {
        self.pool.get().await.map_err(unavailable)
    }

    /// Removes every key under the prefix (tests).
    pub async fn clear(&self) -> Result<(), StateError> {
        let mut conn = self.conn().await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(keys)
                .query_async::<()>(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

#[async_trait]
impl PresenceState for RedisState {
    async fn connect(&self, c: &Connection, now_ms: i64) -> Result<Joined, StateError> {
        let mut conn = self.conn().await?;
        let reply: Vec<redis::Value> = self
            .connect
            .arg(&self.prefix)
            .arg(&c.node_id)
            .arg(&c.user_id)
            .arg(&c.device_id)
            .arg(&c.conn_id)
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let int = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        };
        match int(reply.first()) {
            0 => Ok(Joined::Ignored),
            1 => Ok(Joined::Nothing),
            2 => {
                let meta: String = match reply.get(1) {
                    Some(v) => redis::from_redis_value(v).map_err(unavailable)?,
                    None => return Err(unavailable("connect script returned no meta")),
                };
                Ok(Joined::Device {
                    meta: meta_from(&meta)?,
                    user_came_online: int(reply.get(2)) == 1,
                })
            }
            other => Err(unavailable(format!("connect script returned {other}"))),
        }
    }

    async fn disconnect(
        &self,
        c: &Connection,
        now_ms: i64,
        grace_ms: i64,
    ) -> Result<(), StateError> {
        let mut conn = self.conn().await?;
        self.disconnect
            .arg(&self.prefix)
            .arg(&c.node_id)
            .arg(&c.user_id)
            .arg(&c.device_id)
            .arg(&c.conn_id)
            .arg(now_ms + grace_ms)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn heartbeat(&self, node_id: &str, now_ms: i64) -> Result<bool, StateError> {
        let mut conn = self.conn().await?;
        let added: i64 = redis::cmd("ZADD")
            .arg(format!("{}:nodes", self.prefix))
            .arg(now_ms)
            .arg(node_id)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(added == 1)
    }

    async fn node_gone(&self, node_id: &str, now_ms: i64, grace_ms: i64) -> Result<(), StateError> {
        let mut conn = self.conn().await?;
        self.node_gone
            .arg(&self.prefix)
            .arg(node_id)
            .arg(now_ms + grace_ms)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn expire_nodes(&self, now_ms: i64, ttl_ms: i64) -> Result<usize, StateError> {
        let mut conn = self.conn().await?;
        let n: i64 = self
            .expire_nodes
            .arg(&self.prefix)
            .arg(now_ms)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn take_departures(&self, now_ms: i64) -> Result<Vec<Left>, StateError> {
        let mut conn = self.conn().await?;
        let flat: Vec<redis::Value> = self
            .take_departures
            .arg(&self.prefix)
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        flat.chunks(3)
            .map(|c| {
                let user: String = redis::from_redis_value(&c[0]).map_err(unavailable)?;
                let meta: String = redis::from_redis_value(&c[1]).map_err(unavailable)?;
                let offline: i64 = redis::from_redis_value(&c[2]).map_err(unavailable)?;
                Ok(Left {
                    user_id: user,
                    meta: meta_from(&meta)?,
                    user_went_offline: offline == 1,
                })
            })
            .collect()
    }

    async fn presence(&self, user_ids: &[String]) -> Result<Vec<UserPresence>, StateError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for u in user_ids {
            pipe.cmd("HVALS")
                .arg(format!("{}:devices:{u}", self.prefix));
            pipe.cmd("HGET")
                .arg(format!("{}:lastseen", self.prefix))
                .arg(u);
        }
        let mut conn = self.conn().await?;
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        user_ids
            .iter()
            .zip(replies.chunks(2))
            .map(|(u, r)| {
                let metas: Vec<String> = redis::from_redis_value(&r[0]).map_err(unavailable)?;
                let last_seen: Option<i64> = redis::from_redis_value(&r[1]).map_err(unavailable)?;
                let mut devices = metas
                    .iter()
                    .map(|m| meta_from(m))
                    .collect::<Result<Vec<_>, _>>()?;
                devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
                Ok(UserPresence {
                    user_id: u.clone(),
                    devices,
                    last_seen_ms: last_seen,
                })
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn redis_state_conformance() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("test{}", uuid::Uuid::new_v4().simple());
        let state = Arc::new(
            RedisState::connect(&url, &prefix)
                .await
                .expect("Redis must be reachable at REDIS_URL (scripts/deps.sh starts it)"),
        );
        super::super::conformance::run_all(state.clone()).await;
        state.clear().await.unwrap();
    }
}
