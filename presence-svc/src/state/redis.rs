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
//! - `<p>:shown` HASH user → how many of its online devices are shown
//! - `<p>:closed:<conn>` a closed connection, kept 10 minutes
//!
//! Scripts build keys from the prefix, so this targets a single Redis (or
//! one cluster slot), not a sharded cluster.

use async_trait::async_trait;
use quckchat_runtime::ephemeral::redis::{self, Value};
use quckchat_runtime::ephemeral::{decode, pairs, triples, RedisPool, Script};

use super::{
    capped, Connection, DeviceMeta, Joined, Left, NodeSeen, PresenceState, StateError,
    UserPresence, MAX_SHOWN_DEVICES,
};

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
local p, node, user, dev, conn, now, cap = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
if redis.call('EXISTS', p..':closed:'..conn) == 1 then return {0} end
redis.call('ZADD', p..':nodes', now, node)
redis.call('SADD', p..':node:'..node, user..'|'..dev..'|'..conn)
redis.call('SADD', p..':conns:'..user..':'..dev, conn)
redis.call('ZREM', p..':pending', user..'|'..dev)
local devkey = p..':devices:'..user
if redis.call('HEXISTS', devkey, dev) == 1 then return {1} end
local first = redis.call('HLEN', devkey) == 0
local hidden = ''
if tonumber(redis.call('HGET', p..':shown', user) or '0') >= cap then
  hidden = ',"hidden":true'
else
  redis.call('HINCRBY', p..':shown', user, 1)
end
local meta = '{"device_id":"'..dev..'","phx_ref":"'..conn..'","online_at_ms":'..now..hidden..'}'
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

const TAKE_DEPARTURES: &str = r#"
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
      if not string.find(meta, '"hidden":true', 1, true) then
        if redis.call('HINCRBY', p..':shown', user, -1) <= 0 then
          redis.call('HDEL', p..':shown', user)
        end
      end
      local offline = 0
      if redis.call('HLEN', devkey) == 0 then
        offline = 1
        redis.call('HDEL', p..':shown', user)
        redis.call('HSET', p..':lastseen', user, now)
      end
      table.insert(out, user)
      table.insert(out, meta)
      table.insert(out, offline)
    end
  end
end
return out
"#;

pub struct RedisState {
    redis: RedisPool,
    connect: Script,
    disconnect: Script,
    node_gone: Script,
    expire_nodes: Script,
    take_departures: Script,
}

fn meta_from(json: &str) -> Result<DeviceMeta, StateError> {
    serde_json::from_str(json).map_err(|e| {
        StateError::Malformed(format!(
            "device meta: {:?} error at column {}",
            e.classify(),
            e.column()
        ))
    })
}

impl RedisState {
    /// Connects to `url` and checks Redis answers. `prefix` namespaces keys.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StateError> {
        Ok(Self::new(RedisPool::connect(url, prefix).await?))
    }

    /// Presence state on an open pool; keys go under the pool's prefix.
    pub fn new(redis: RedisPool) -> Self {
        let with_fns = |name, body: &str| Script::new(name, &format!("{CLOSE_FN}\n{body}"));
        Self {
            redis,
            connect: Script::new("connect", CONNECT),
            disconnect: with_fns("disconnect", DISCONNECT),
            node_gone: with_fns("node_gone", NODE_GONE),
            expire_nodes: with_fns("expire_nodes", EXPIRE_NODES),
            take_departures: Script::new("take_departures", TAKE_DEPARTURES),
        }
    }

    /// Removes every key under the prefix (tests).
    pub async fn clear(&self) -> Result<(), StateError> {
        self.redis.clear().await.map(|_| ())
    }
}

#[async_trait]
impl PresenceState for RedisState {
    async fn connect(&self, c: &Connection, now_ms: i64) -> Result<Joined, StateError> {
        let reply: Vec<Value> = self
            .connect
            .call()
            .arg(self.redis.prefix())
            .arg(&c.node_id)
            .arg(&c.user_id)
            .arg(&c.device_id)
            .arg(&c.conn_id)
            .arg(now_ms)
            .arg(MAX_SHOWN_DEVICES)
            .run(&self.redis)
            .await?;
        connect_reply(&reply)
    }

    async fn disconnect(
        &self,
        c: &Connection,
        now_ms: i64,
        grace_ms: i64,
    ) -> Result<(), StateError> {
        self.disconnect
            .call()
            .arg(self.redis.prefix())
            .arg(&c.node_id)
            .arg(&c.user_id)
            .arg(&c.device_id)
            .arg(&c.conn_id)
            .arg(now_ms + grace_ms)
            .run::<i64>(&self.redis)
            .await?;
        Ok(())
    }

    async fn heartbeat(&self, node_id: &str, now_ms: i64) -> Result<NodeSeen, StateError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(self.redis.key(&["nodes"]))
            .arg(now_ms)
            .arg(node_id)
            .cmd("SCARD")
            .arg(self.redis.key(&["node", node_id]));
        let (added, connections): (i64, i64) = self.redis.pipeline(&pipe).await?;
        Ok(NodeSeen {
            unknown: added == 1,
            connections: usize::try_from(connections).unwrap_or(0),
        })
    }

    async fn node_connections(&self, node_id: &str) -> Result<Vec<Connection>, StateError> {
        let members: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(self.redis.key(&["node", node_id])))
            .await?;
        members
            .iter()
            .map(|m| match m.splitn(3, '|').collect::<Vec<_>>()[..] {
                [user, device, conn] => Ok(Connection {
                    node_id: node_id.to_owned(),
                    conn_id: conn.to_owned(),
                    user_id: user.to_owned(),
                    device_id: device.to_owned(),
                }),
                _ => Err(StateError::Malformed(format!(
                    "node connection entry without two separators ({} bytes)",
                    m.len()
                ))),
            })
            .collect()
    }

    async fn node_gone(&self, node_id: &str, now_ms: i64, grace_ms: i64) -> Result<(), StateError> {
        self.node_gone
            .call()
            .arg(self.redis.prefix())
            .arg(node_id)
            .arg(now_ms + grace_ms)
            .run::<i64>(&self.redis)
            .await?;
        Ok(())
    }

    async fn expire_nodes(&self, now_ms: i64, ttl_ms: i64) -> Result<usize, StateError> {
        let n: i64 = self
            .expire_nodes
            .call()
            .arg(self.redis.prefix())
            .arg(now_ms)
            .arg(ttl_ms)
            .run(&self.redis)
            .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn take_departures(&self, now_ms: i64) -> Result<Vec<Left>, StateError> {
        let flat: Vec<Value> = self
            .take_departures
            .call()
            .arg(self.redis.prefix())
            .arg(now_ms)
            .run(&self.redis)
            .await?;
        departures_reply(&flat)
    }

    async fn presence(&self, user_ids: &[String]) -> Result<Vec<UserPresence>, StateError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let lastseen = self.redis.key(&["lastseen"]);
        for u in user_ids {
            pipe.cmd("HVALS").arg(self.redis.key(&["devices", u]));
            pipe.cmd("HGET").arg(&lastseen).arg(u);
        }
        let replies: Vec<Value> = self.redis.pipeline(&pipe).await?;
        presence_reply(user_ids, &replies)
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.redis.ping().await
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

/// The connect script's reply: `{0}`, `{1}` or `{2, meta, first}`.
fn connect_reply(reply: &[Value]) -> Result<Joined, StateError> {
    match reply {
        [Value::Int(0)] => Ok(Joined::Ignored),
        [Value::Int(1)] => Ok(Joined::Nothing),
        [Value::Int(2), meta, first] => {
            let meta: String = decode("connect meta", meta)?;
            let first: i64 = decode("connect first", first)?;
            Ok(Joined::Device {
                meta: meta_from(&meta)?,
                user_came_online: first == 1,
            })
        }
        _ => Err(StateError::Malformed(format!(
            "connect: a reply of {} values is none of {{0}}, {{1}}, {{2, meta, first}}",
            reply.len()
        ))),
    }
}

/// The take_departures script's reply: `user, meta, offline` triples.
fn departures_reply(flat: &[Value]) -> Result<Vec<Left>, StateError> {
    triples::<String, String, i64>("take_departures", flat)?
        .into_iter()
        .map(|(user_id, meta, offline)| {
            Ok(Left {
                user_id,
                meta: meta_from(&meta)?,
                user_went_offline: offline == 1,
            })
        })
        .collect()
}

/// The presence pipeline's replies: `HVALS devices, HGET lastseen` per user.
fn presence_reply(user_ids: &[String], replies: &[Value]) -> Result<Vec<UserPresence>, StateError> {
    let per_user = pairs::<Vec<String>, Option<i64>>("presence", replies)?;
    if per_user.len() != user_ids.len() {
        return Err(StateError::Malformed(format!(
            "presence: {} replies for {} users",
            per_user.len(),
            user_ids.len()
        )));
    }
    user_ids
        .iter()
        .zip(per_user)
        .map(|(u, (metas, last_seen))| {
            let devices = capped(
                metas
                    .iter()
                    .map(|m| meta_from(m))
                    .collect::<Result<Vec<_>, _>>()?,
            );
            Ok(UserPresence {
                user_id: u.clone(),
                devices,
                last_seen_ms: last_seen,
            })
        })
        .collect()
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

    /// Every key under `<prefix>:`, without the prefix.
    async fn keys_under(state: &RedisState, prefix: &str) -> std::collections::BTreeSet<String> {
        let keys: Vec<String> = state
            .redis
            .query(redis::cmd("KEYS").arg(format!("{prefix}:*")))
            .await
            .unwrap();
        keys.into_iter()
            .map(|k| k[prefix.len() + 1..].to_owned())
            .collect()
    }

    #[tokio::test]
    async fn every_key_carries_the_redis_key_prefix() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("keys{id}");
        let state = RedisState::connect(&url, &prefix)
            .await
            .expect("Redis must be reachable at REDIS_URL (scripts/deps.sh starts it)");
        let c = Connection {
            node_id: format!("n{id}"),
            conn_id: format!("c{id}"),
            user_id: format!("u{id}"),
            device_id: "phone".into(),
        };
        let (n, u, conn) = (&c.node_id, &c.user_id, &c.conn_id);
        state.connect(&c, 1_000).await.unwrap();
        assert_eq!(
            keys_under(&state, &prefix).await,
            [
                format!("devices:{u}"),
                format!("conns:{u}:phone"),
                format!("node:{n}"),
                "nodes".to_owned(),
                "shown".to_owned(),
            ]
            .into_iter()
            .collect(),
        );
        state.disconnect(&c, 2_000, 5_000).await.unwrap();
        let left = state.take_departures(10_000).await.unwrap();
        assert_eq!(left.len(), 1);
        let after = keys_under(&state, &prefix).await;
        for key in [format!("closed:{conn}"), "lastseen".to_owned()] {
            assert!(after.contains(&key), "{key} not under {prefix}: {after:?}");
        }
        // Nothing naming this test's ids lives outside the prefix.
        let anywhere: Vec<String> = state
            .redis
            .query(redis::cmd("KEYS").arg(format!("*{id}*")))
            .await
            .unwrap();
        assert!(!anywhere.is_empty());
        for key in &anywhere {
            assert!(key.starts_with(&format!("{prefix}:")), "{key}");
        }
        state.clear().await.unwrap();
        assert!(keys_under(&state, &prefix).await.is_empty());
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    const META: &str = r#"{"device_id":"phone","phx_ref":"k1","online_at_ms":5}"#;

    #[test]
    fn script_replies_decode() {
        assert_eq!(connect_reply(&[Value::Int(0)]), Ok(Joined::Ignored));
        assert_eq!(connect_reply(&[Value::Int(1)]), Ok(Joined::Nothing));
        let Ok(Joined::Device {
            meta,
            user_came_online: true,
        }) = connect_reply(&[Value::Int(2), bulk(META), Value::Int(1)])
        else {
            panic!("a device join")
        };
        assert_eq!((meta.device_id.as_str(), meta.online_at_ms), ("phone", 5));
        let left = departures_reply(&[bulk("u1"), bulk(META), Value::Int(1)]).unwrap();
        assert_eq!(left.len(), 1);
        assert!(left[0].user_went_offline);
        let users = ["u1".to_owned(), "u2".to_owned()];
        let replies = [
            Value::Array(vec![bulk(META)]),
            Value::Nil,
            Value::Array(vec![]),
            bulk("42"),
        ];
        let p = presence_reply(&users, &replies).unwrap();
        assert!(p[0].online() && p[0].last_seen_ms.is_none());
        assert!(!p[1].online());
        assert_eq!(p[1].last_seen_ms, Some(42));
    }

    #[test]
    fn malformed_script_replies_are_errors_not_panics() {
        fn malformed<T>(r: Result<T, StateError>) -> bool {
            matches!(r, Err(StateError::Malformed(_)))
        }
        assert!(malformed(connect_reply(&[])));
        assert!(malformed(connect_reply(&[Value::Int(7)])));
        assert!(malformed(connect_reply(&[Value::Int(2), bulk(META)])));
        assert!(malformed(connect_reply(&[
            Value::Int(2),
            Value::Nil,
            Value::Int(1)
        ])));
        assert!(malformed(connect_reply(&[
            Value::Int(2),
            bulk("{"),
            Value::Int(1)
        ])));
        assert!(malformed(departures_reply(&[bulk("u1"), bulk(META)])));
        assert!(malformed(departures_reply(&[
            bulk("u1"),
            bulk(META),
            bulk("x")
        ])));
        let users = ["u1".to_owned(), "u2".to_owned()];
        assert!(malformed(presence_reply(
            &users,
            &[Value::Array(vec![]), Value::Nil]
        )));
        assert!(malformed(presence_reply(
            &users,
            &[Value::Array(vec![]), Value::Nil, Value::Nil]
        )));
        assert!(malformed(presence_reply(
            &users[..1],
            &[Value::Int(3), Value::Nil]
        )));
    }
}
