//! The ephemeral-state kit: what a service needs to keep short-lived shared
//! state (presence, call state, huddle participants) in Redis, written once.
//!
//! Each kind of state follows one pattern: a trait in its service crate, two
//! implementations — Redis (distributed, shared by every replica) and memory
//! (all-in-one) — and one conformance suite run against both. The Redis side
//! builds on this module instead of its own plumbing:
//!
//! - [`RedisPool`] — a connection pool from a URL (errors name the problem,
//!   never the password), every key under one prefix ([`RedisPool::key`]),
//!   commands, pipelines and [`RedisPool::ping`] for readiness;
//! - [`Script`] — a Lua script held once and run with keys and arguments; a
//!   Redis that lost its script cache (`NOSCRIPT`) gets it loaded again;
//! - [`StateError`] — the one error of every state implementation;
//! - [`decode`], [`pairs`], [`triples`] — reading replies without indexing:
//!   a reply of the wrong shape is a [`StateError::Malformed`], not a panic.
//!
//! A state's readiness check is [`crate::admin::health_check`] over its
//! `ping`.

use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument as _;

use deadpool_redis::redis::{FromRedisValue, IntoConnectionInfo, ToRedisArgs, Value};
use deadpool_redis::{Config, Pool, Runtime};

/// The `redis` crate this kit is built with, so state crates need no
/// dependency of their own (and cannot drift to another version).
pub use deadpool_redis::redis;

/// Why a state operation failed. The text is written here: it names the
/// operation and the kind of failure, never credentials or reply contents,
/// so it is fit for logs and health reports. Clients get a fixed message
/// from the service, not this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The backend cannot be reached, or refused the operation.
    #[error("state unavailable: {0}")]
    Unavailable(String),
    /// The backend answered with something of the wrong shape or type.
    #[error("state reply malformed: {0}")]
    Malformed(String),
}

impl StateError {
    /// The text without the kind, to wrap in another message.
    fn detail(&self) -> &str {
        match self {
            StateError::Unavailable(d) | StateError::Malformed(d) => d,
        }
    }

    /// A Redis error: replies that do not convert are malformed, the rest
    /// (I/O, server errors, script errors) unavailable.
    fn from_redis(what: &str, e: &redis::RedisError) -> Self {
        if e.kind() == redis::ErrorKind::TypeError {
            StateError::Malformed(format!("{what}: reply of an unexpected type"))
        } else {
            StateError::Unavailable(format!("{what}: {e}"))
        }
    }
}

/// A Redis connection pool whose keys all live under one prefix.
/// Cheap to clone (one pool shared by the clones).
#[derive(Clone)]
pub struct RedisPool {
    pool: Pool,
    prefix: Arc<str>,
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPool")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisPool {
    /// Connects to `url` (`redis://` or `rediss://`) and checks Redis
    /// answers. `prefix` namespaces every key ([`RedisPool::key`]), so
    /// environments and tests can share one Redis.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StateError> {
        let info = url
            .into_connection_info()
            .map_err(|e| StateError::Unavailable(format!("not a valid Redis URL: {e}")))?;
        let addr = info.addr.to_string();
        let pool = Config::from_connection_info(info)
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| StateError::Unavailable(format!("Redis at {addr}: {e}")))?;
        let redis = Self {
            pool,
            prefix: prefix.into(),
        };
        redis.ping().await.map_err(|e| {
            StateError::Unavailable(format!("Redis at {addr} does not answer: {}", e.detail()))
        })?;
        Ok(redis)
    }

    /// The key prefix, for scripts that build their keys themselves.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>:<part>:<part>…`, the one place keys get their prefix.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = String::with_capacity(
            self.prefix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>(),
        );
        key.push_str(&self.prefix);
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    /// A connection from the pool, for what the helpers here do not cover.
    pub async fn conn(&self) -> Result<deadpool_redis::Connection, StateError> {
        self.pool
            .get()
            .await
            .map_err(|e| StateError::Unavailable(format!("no Redis connection: {e}")))
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StateError> {
        let started = Instant::now();
        let result = async {
            let mut conn = self.conn().await?;
            cmd.query_async(&mut conn)
                .await
                .map_err(|e| StateError::from_redis("command", &e))
        }
        .instrument(redis_span("command"))
        .await;
        observe("command", started, &result);
        result
    }

    /// Runs a pipeline in one round trip.
    pub async fn pipeline<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StateError> {
        let started = Instant::now();
        let result = async {
            let mut conn = self.conn().await?;
            pipe.query_async(&mut conn)
                .await
                .map_err(|e| StateError::from_redis("pipeline", &e))
        }
        .instrument(redis_span("pipeline"))
        .await;
        observe("pipeline", started, &result);
        result
    }

    /// Whether Redis answers (readiness).
    pub async fn ping(&self) -> Result<(), StateError> {
        let pong: String = self.query(&redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StateError::Malformed("PING: not answered PONG".into()))
        }
    }

    /// Removes every key under the prefix; returns how many (tests).
    pub async fn clear(&self) -> Result<usize, StateError> {
        let pattern = format!("{}:*", self.prefix);
        let keys: Vec<String> = self.query(redis::cmd("KEYS").arg(pattern)).await?;
        if keys.is_empty() {
            return Ok(0);
        }
        self.query(redis::cmd("DEL").arg(keys)).await
    }
}

/// A Lua script, held once per state and run with keys and arguments. Redis
/// runs it by hash; when Redis does not have it (restart, `SCRIPT FLUSH`) it
/// is loaded again.
pub struct Script {
    name: &'static str,
    script: redis::Script,
}

impl Script {
    /// `name` names the script in errors.
    pub fn new(name: &'static str, code: &str) -> Self {
        Self {
            name,
            script: redis::Script::new(code),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Starts a call; add keys and arguments, then [`ScriptCall::run`].
    pub fn call(&self) -> ScriptCall<'_> {
        ScriptCall {
            name: self.name,
            invocation: self.script.prepare_invoke(),
        }
    }
}

/// One call of a [`Script`] being built.
pub struct ScriptCall<'a> {
    name: &'static str,
    invocation: redis::ScriptInvocation<'a>,
}

impl ScriptCall<'_> {
    /// Adds to `KEYS`.
    pub fn key(mut self, key: impl ToRedisArgs) -> Self {
        self.invocation.key(key);
        self
    }

    /// Adds to `ARGV`.
    pub fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.invocation.arg(arg);
        self
    }

    /// Runs the script on `redis`.
    pub async fn run<T: FromRedisValue>(&self, redis: &RedisPool) -> Result<T, StateError> {
        let started = Instant::now();
        let result = async {
            let mut conn = redis.conn().await?;
            self.invocation
                .invoke_async(&mut conn)
                .await
                .map_err(|e| StateError::from_redis(&format!("script {}", self.name), &e))
        }
        .instrument(redis_span(self.name))
        .await;
        observe(self.name, started, &result);
        result
    }
}

/// A Redis call's span (`redis.<op>`).
fn redis_span(op: &'static str) -> tracing::Span {
    tracing::info_span!(
        target: crate::telemetry::TRACE,
        "redis",
        otel.name = %format_args!("redis.{op}"),
        otel.kind = "client",
        db.system = "redis",
        db.operation = op,
    )
}

/// Records one Redis call (waiting for a pooled connection included) in
/// `quckchat_redis_seconds{op}`, and a failed one in
/// `quckchat_redis_errors_total{op}`. `op` is `command`, `pipeline` or a
/// script's name: static, so recording allocates nothing.
fn observe<T>(op: &'static str, started: Instant, result: &Result<T, StateError>) {
    metrics::histogram!("quckchat_redis_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!("quckchat_redis_errors_total", "op" => op).increment(1);
    }
}

/// What a reply value is, for errors (never its contents).
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Int(_) => "integer",
        Value::BulkString(_) => "bulk string",
        Value::Array(_) => "array",
        Value::SimpleString(_) => "simple string",
        Value::Okay => "OK",
        Value::Map(_) => "map",
        Value::Set(_) => "set",
        Value::Double(_) => "double",
        Value::Boolean(_) => "boolean",
        Value::VerbatimString { .. } => "verbatim string",
        Value::ServerError(_) => "error",
        _ => "other value",
    }
}

/// One reply value as `T`; `what` names it in the error.
pub fn decode<T: FromRedisValue>(what: &str, v: &Value) -> Result<T, StateError> {
    redis::from_redis_value(v).map_err(|_| {
        StateError::Malformed(format!(
            "{what}: a {} reply is not {}",
            kind(v),
            std::any::type_name::<T>()
        ))
    })
}

/// The values of `flat` taken `n` at a time, each group read by `read`.
/// An error when `flat` does not divide into groups of `n`.
fn groups<T>(
    what: &str,
    flat: &[Value],
    n: usize,
    mut read: impl FnMut(&[Value]) -> Result<T, StateError>,
) -> Result<Vec<T>, StateError> {
    if !flat.len().is_multiple_of(n) {
        return Err(StateError::Malformed(format!(
            "{what}: {} values do not make groups of {n}",
            flat.len()
        )));
    }
    flat.chunks_exact(n).map(&mut read).collect()
}

/// A flat reply `[a1, b1, a2, b2, …]` as pairs.
pub fn pairs<A, B>(what: &str, flat: &[Value]) -> Result<Vec<(A, B)>, StateError>
where
    A: FromRedisValue,
    B: FromRedisValue,
{
    groups(what, flat, 2, |g| match g {
        [a, b] => Ok((decode(what, a)?, decode(what, b)?)),
        _ => Err(StateError::Malformed(format!("{what}: short pair"))),
    })
}

/// A flat reply `[a1, b1, c1, a2, b2, c2, …]` as triples.
pub fn triples<A, B, C>(what: &str, flat: &[Value]) -> Result<Vec<(A, B, C)>, StateError>
where
    A: FromRedisValue,
    B: FromRedisValue,
    C: FromRedisValue,
{
    groups(what, flat, 3, |g| match g {
        [a, b, c] => Ok((decode(what, a)?, decode(what, b)?, decode(what, c)?)),
        _ => Err(StateError::Malformed(format!("{what}: short triple"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::health_check;
    use futures::FutureExt;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn pairs_and_triples_read_flat_replies() {
        let flat = [bulk("a"), Value::Int(1), bulk("b"), Value::Nil];
        let got: Vec<(String, Option<i64>)> = pairs("p", &flat).unwrap();
        assert_eq!(got, vec![("a".into(), Some(1)), ("b".into(), None)]);
        let flat = [bulk("u"), bulk("{}"), Value::Int(0)];
        let got: Vec<(String, String, i64)> = triples("t", &flat).unwrap();
        assert_eq!(got, vec![("u".into(), "{}".into(), 0)]);
        let none: Vec<(String, i64)> = pairs("p", &[]).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn replies_of_the_wrong_length_are_malformed() {
        let err =
            pairs::<String, i64>("lastseen", &[bulk("a"), Value::Int(1), bulk("b")]).unwrap_err();
        assert_eq!(
            err,
            StateError::Malformed("lastseen: 3 values do not make groups of 2".into())
        );
        let err =
            triples::<String, String, i64>("departures", &[bulk("u"), bulk("m")]).unwrap_err();
        assert!(matches!(err, StateError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn replies_of_the_wrong_type_are_malformed_without_their_contents() {
        let flat = [bulk("u"), Value::Array(vec![]), bulk("secret-ish")];
        let err = triples::<String, String, i64>("departures", &flat).unwrap_err();
        let StateError::Malformed(text) = &err else {
            panic!("{err:?}")
        };
        assert!(text.starts_with("departures: a "), "{text}");
        let err = decode::<i64>("count", &bulk("secret-ish")).unwrap_err();
        assert!(matches!(err, StateError::Malformed(_)), "{err:?}");
        assert!(!err.to_string().contains("secret-ish"), "{err}");
        assert!(decode::<i64>("count", &Value::Nil).is_err());
    }

    #[tokio::test]
    async fn a_bad_url_is_named_before_any_connection() {
        let err = RedisPool::connect("http://nope", "p").await.unwrap_err();
        assert!(err.to_string().contains("not a valid Redis URL"), "{err}");
        let err = RedisPool::connect("redis://:hunter2@127.0.0.1:1", "p")
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("127.0.0.1:1"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    #[tokio::test]
    async fn kit_against_redis_prefixes_keys_runs_scripts_and_pings() {
        // Installed first: what is recorded before it is lost.
        let metrics = crate::admin::metrics_handle();
        let prefix = format!("test{}", uuid::Uuid::new_v4().simple());
        let redis = RedisPool::connect(&redis_url(), &prefix)
            .await
            .expect("Redis must be reachable at REDIS_URL (scripts/deps.sh starts it)");
        redis.ping().await.unwrap();
        assert_eq!(
            redis.key(&["conns", "u1", "d1"]),
            format!("{prefix}:conns:u1:d1")
        );

        // A script given its keys through the prefix helper.
        let incr = Script::new(
            "incr_pair",
            "redis.call('INCRBY', KEYS[1], ARGV[1]) redis.call('SET', KEYS[2], ARGV[2]) \
             return {KEYS[1], redis.call('GET', KEYS[1]), KEYS[2], redis.call('GET', KEYS[2])}",
        );
        let (a, b) = (redis.key(&["n", "a"]), redis.key(&["n", "b"]));
        let reply: Vec<Value> = incr
            .call()
            .key(&a)
            .key(&b)
            .arg(5)
            .arg(7)
            .run(&redis)
            .await
            .unwrap();
        let got: Vec<(String, i64)> = pairs("incr_pair", &reply).unwrap();
        assert_eq!(got, vec![(a.clone(), 5), (b.clone(), 7)]);

        // The script survives Redis forgetting it.
        redis
            .query::<()>(redis::cmd("SCRIPT").arg("FLUSH"))
            .await
            .unwrap();
        let reply: Vec<Value> = incr
            .call()
            .key(&a)
            .key(&b)
            .arg(1)
            .arg(0)
            .run(&redis)
            .await
            .unwrap();
        let got: Vec<(String, i64)> = pairs("incr_pair", &reply).unwrap();
        assert_eq!(got, vec![(a.clone(), 6), (b.clone(), 0)]);

        // A script failing is an error, not a panic.
        let broken = Script::new("broken", "return redis.call('NO_SUCH_COMMAND')");
        let err = broken.call().run::<i64>(&redis).await.unwrap_err();
        assert!(err.to_string().contains("script broken"), "{err}");
        // A reply read as the wrong type is malformed.
        let err = incr
            .call()
            .key(&a)
            .key(&b)
            .arg(1)
            .arg(0)
            .run::<i64>(&redis)
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Malformed(_)), "{err:?}");

        // Pipelines and keys stay under the prefix, and clear removes them.
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&a).cmd("EXISTS").arg(&b);
        let (n, exists): (i64, bool) = redis.pipeline(&pipe).await.unwrap();
        assert_eq!((n, exists), (7, true));
        let keys: Vec<String> = redis
            .query(redis::cmd("KEYS").arg(format!("{prefix}*")))
            .await
            .unwrap();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(redis.clear().await.unwrap(), 2);
        assert_eq!(redis.clear().await.unwrap(), 0);

        // Every call is timed by its op, failures counted.
        let rendered = metrics.render();
        let value = |series: &str| -> f64 {
            rendered
                .lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{series} in {rendered}"))
        };
        assert!(value("quckchat_redis_seconds_count{op=\"incr_pair\"}") >= 3.0);
        assert!(value("quckchat_redis_seconds_count{op=\"pipeline\"}") >= 1.0);
        assert!(value("quckchat_redis_seconds_count{op=\"command\"}") >= 4.0);
        assert!(value("quckchat_redis_errors_total{op=\"broken\"}") >= 1.0);
        assert!(value("quckchat_redis_errors_total{op=\"incr_pair\"}") >= 1.0);

        // The generic readiness adapter over the pool's ping.
        let check = health_check("redis", redis.clone(), |r| r.ping().boxed());
        assert_eq!(check.name(), "redis");
        assert_eq!(check.check().await, Ok(()));
    }

    #[tokio::test]
    async fn health_check_reports_a_failing_ping() {
        struct Down;
        impl Down {
            async fn ping(&self) -> Result<(), StateError> {
                Err(StateError::Unavailable("connection refused".into()))
            }
        }
        let check = health_check("state", Down, |d| d.ping().boxed());
        assert_eq!(
            check.check().await,
            Err("state unavailable: connection refused".into())
        );
    }
}
