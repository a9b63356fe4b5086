//! What was pushed to which device, so a job handled twice (a retried send
//! handed over again, a redelivery after a replica died) pushes each device
//! once. Redis in distributed mode (shared by the replicas), memory
//! all-in-one.
//!
//! A push is first *claimed* for a short while, then marked *sent* for a
//! day: a replica that dies between the two leaves a claim that expires, so
//! the job's redelivery can push it; two replicas never push it at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use quckchat_runtime::ephemeral::{redis, RedisPool, Script, StateError};

/// How long a claim holds before another replica may push it.
pub const CLAIM: Duration = Duration::from_secs(60);
/// How long a sent push is remembered.
pub const SENT: Duration = Duration::from_secs(24 * 3600);

#[async_trait]
pub trait SentLog: Send + Sync + 'static {
    /// Claims `key` for [`CLAIM`]: false when it is claimed or sent.
    async fn claim(&self, key: &str) -> Result<bool, StateError>;
    /// Marks `key` sent for [`SENT`].
    async fn sent(&self, key: &str) -> Result<(), StateError>;
    /// Gives a claim up (the push failed for good, or will be retried).
    async fn release(&self, key: &str) -> Result<(), StateError>;
    /// Whether `key` was sent.
    async fn was_sent(&self, key: &str) -> Result<bool, StateError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Claimed,
    Sent,
}

/// In this process (all-in-one).
#[derive(Default)]
pub struct MemorySentLog {
    marks: Mutex<HashMap<String, (Mark, Instant)>>,
}

impl MemorySentLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Mark, Instant)>> {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if marks.len() > 100_000 {
            let now = Instant::now();
            marks.retain(|_, (_, until)| *until > now);
        }
        marks
    }
}

#[async_trait]
impl SentLog for MemorySentLog {
    async fn claim(&self, key: &str) -> Result<bool, StateError> {
        let mut marks = self.marks();
        let now = Instant::now();
        match marks.get(key) {
            Some((_, until)) if *until > now => Ok(false),
            _ => {
                marks.insert(key.to_owned(), (Mark::Claimed, now + CLAIM));
                Ok(true)
            }
        }
    }

    async fn sent(&self, key: &str) -> Result<(), StateError> {
        self.marks()
            .insert(key.to_owned(), (Mark::Sent, Instant::now() + SENT));
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<(), StateError> {
        let mut marks = self.marks();
        if matches!(marks.get(key), Some((Mark::Claimed, _))) {
            marks.remove(key);
        }
        Ok(())
    }

    async fn was_sent(&self, key: &str) -> Result<bool, StateError> {
        Ok(matches!(
            self.marks().get(key),
            Some((Mark::Sent, until)) if *until > Instant::now()
        ))
    }
}

/// In Redis: `<prefix>:push:<key>` = `claimed` (PX [`CLAIM`]) or `sent`
/// (PX [`SENT`]).
pub struct RedisSentLog {
    redis: RedisPool,
    release: Script,
}

const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == 'claimed' then return redis.call('DEL', KEYS[1]) end return 0";

impl RedisSentLog {
    pub fn new(redis: RedisPool) -> Self {
        Self {
            redis,
            release: Script::new("push_release", RELEASE),
        }
    }

    fn key(&self, key: &str) -> String {
        self.redis.key(&["push", key])
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl SentLog for RedisSentLog {
    async fn claim(&self, key: &str) -> Result<bool, StateError> {
        let set: Option<String> = self
            .redis
            .query(
                redis::cmd("SET")
                    .arg(self.key(key))
                    .arg("claimed")
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(CLAIM)),
            )
            .await?;
        Ok(set.is_some())
    }

    async fn sent(&self, key: &str) -> Result<(), StateError> {
        self.redis
            .query::<()>(
                redis::cmd("SET")
                    .arg(self.key(key))
                    .arg("sent")
                    .arg("PX")
                    .arg(millis(SENT)),
            )
            .await
    }

    async fn release(&self, key: &str) -> Result<(), StateError> {
        // Only a claim: a sent mark stays.
        self.release
            .call()
            .key(self.key(key))
            .run::<i64>(&self.redis)
            .await
            .map(|_| ())
    }

    async fn was_sent(&self, key: &str) -> Result<bool, StateError> {
        let v: Option<String> = self
            .redis
            .query(redis::cmd("GET").arg(self.key(key)))
            .await?;
        Ok(v.as_deref() == Some("sent"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    async fn conformance(log: &dyn SentLog) {
        let key = format!("m1:{}", uuid::Uuid::new_v4().simple());
        assert!(!log.was_sent(&key).await.unwrap());
        assert!(log.claim(&key).await.unwrap());
        assert!(!log.claim(&key).await.unwrap(), "claimed once");
        log.release(&key).await.unwrap();
        assert!(log.claim(&key).await.unwrap(), "released: claimable again");
        log.sent(&key).await.unwrap();
        assert!(log.was_sent(&key).await.unwrap());
        assert!(!log.claim(&key).await.unwrap(), "sent: never again");
        log.release(&key).await.unwrap();
        assert!(
            log.was_sent(&key).await.unwrap(),
            "release keeps a sent mark"
        );
    }

    #[tokio::test]
    async fn memory_sent_log() {
        conformance(&MemorySentLog::new()).await;
    }

    #[tokio::test]
    async fn redis_sent_log() {
        let prefix = quckchat_runtime::testkit::unique("push");
        let pool = RedisPool::connect(&quckchat_runtime::testkit::redis_url(), &prefix)
            .await
            .expect("Redis must be reachable at REDIS_URL (scripts/deps.sh starts it)");
        conformance(&RedisSentLog::new(pool.clone())).await;
        pool.clear().await.unwrap();
    }
}
