//! Call state in this process's memory (all-in-one).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use async_trait::async_trait;

use super::{CallState, Commit, StateError, Timer, Versioned, ENDED_RETENTION};
use crate::call::CallStage;

#[derive(Default)]
struct Inner {
    calls: HashMap<String, Stored>,
    /// user → the live call they are in.
    users: HashMap<String, String>,
    /// `Timer::member` → (due ms, call id, timer).
    timers: HashMap<String, (i64, String, Timer)>,
    /// Ended calls in the order they are to be forgotten.
    forget: VecDeque<(Instant, String)>,
}

struct Stored {
    current: Versioned,
    /// Set once the call ended.
    forget_at: Option<Instant>,
}

impl Inner {
    /// Forgets the ended calls past their retention: O(1) per call, from
    /// the front of the queue (every call gets the same retention).
    fn prune(&mut self) {
        let now = Instant::now();
        while let Some((at, _)) = self.forget.front() {
            if *at > now {
                break;
            }
            if let Some((at, id)) = self.forget.pop_front() {
                if self.calls.get(&id).and_then(|s| s.forget_at) == Some(at) {
                    self.calls.remove(&id);
                }
            }
        }
    }

    fn live(&self, call_id: &str) -> bool {
        self.calls
            .get(call_id)
            .is_some_and(|s| s.current.call.stage != CallStage::Ended)
    }

    /// Free: in no call, in `call_id`, or in one that ended.
    fn free(&self, user: &str, call_id: &str) -> bool {
        match self.users.get(user) {
            None => true,
            Some(id) => id == call_id || !self.live(id),
        }
    }
}

/// [`CallState`] behind one lock: every commit is atomic by construction.
pub struct MemoryCallState {
    inner: Mutex<Inner>,
    retention: std::time::Duration,
}

impl Default for MemoryCallState {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCallState {
    pub fn new() -> Self {
        Self::with_retention(ENDED_RETENTION)
    }

    /// Ended calls kept for `retention` instead of [`ENDED_RETENTION`].
    pub fn with_retention(retention: std::time::Duration) -> Self {
        Self {
            inner: Mutex::default(),
            retention,
        }
    }

    /// Calls held, live or ended (tests).
    pub fn len(&self) -> usize {
        self.lock().calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied commit
        // (each is applied after its checks, without fallible steps).
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl CallState for MemoryCallState {
    async fn load(&self, call_id: &str) -> Result<Option<Versioned>, StateError> {
        let mut inner = self.lock();
        inner.prune();
        Ok(inner.calls.get(call_id).map(|s| s.current.clone()))
    }

    async fn active_call_id(&self, user_id: &str) -> Result<Option<String>, StateError> {
        let inner = self.lock();
        Ok(inner
            .users
            .get(user_id)
            .filter(|id| inner.live(id))
            .cloned())
    }

    async fn commit(&self, commit: &Commit) -> Result<bool, StateError> {
        let mut inner = self.lock();
        inner.prune();
        let id = &commit.call.id;
        let version = inner.calls.get(id).map(|s| s.current.version);
        if version != commit.expect {
            return Ok(false);
        }
        if !commit.claim.iter().all(|u| inner.free(u, id)) {
            return Ok(false);
        }
        let ended = commit.call.stage == CallStage::Ended;
        for user in &commit.claim {
            inner.users.insert(user.clone(), id.clone());
        }
        if ended {
            for user in [&commit.call.caller_id, &commit.call.callee_id] {
                if inner.users.get(user) == Some(id) {
                    inner.users.remove(user);
                }
            }
        }
        for timer in &commit.clear_timers {
            inner.timers.remove(&timer.member(id));
        }
        for (timer, due) in &commit.set_timers {
            inner
                .timers
                .insert(timer.member(id), (*due, id.clone(), *timer));
        }
        let forget_at = ended.then(|| Instant::now() + self.retention);
        if let Some(at) = forget_at {
            inner.forget.push_back((at, id.clone()));
        }
        inner.calls.insert(
            id.clone(),
            Stored {
                current: Versioned {
                    call: commit.call.clone(),
                    version: version.unwrap_or(0) + 1,
                },
                forget_at,
            },
        );
        Ok(true)
    }

    async fn due_timers(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, Timer)>, StateError> {
        let inner = self.lock();
        let mut due: Vec<_> = inner
            .timers
            .values()
            .filter(|(at, _, _)| *at <= now_ms)
            .map(|(at, id, timer)| (*at, id.clone(), *timer))
            .collect();
        due.sort_by_key(|(at, _, _)| *at);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|(_, id, timer)| (id, timer))
            .collect())
    }

    async fn drop_timer(&self, call_id: &str, timer: Timer) -> Result<(), StateError> {
        self.lock().timers.remove(&timer.member(call_id));
        Ok(())
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    #[tokio::test]
    async fn ended_calls_are_forgotten_after_the_retention_live_ones_never() {
        use crate::call::{Call, CallStage, CallType};
        use crate::state::{CallState, Commit};
        let state = super::MemoryCallState::with_retention(std::time::Duration::from_millis(50));
        let mut ids = Vec::new();
        for n in 0..100 {
            let call = Call::ringing(
                format!("c{n}"),
                &format!("a{n}"),
                "d",
                "k",
                &format!("b{n}"),
                CallType::Audio,
                None,
                0,
            );
            let mut commit = Commit::of(
                &crate::state::Versioned {
                    call: call.clone(),
                    version: 0,
                },
                call.clone(),
            );
            commit.expect = None;
            assert!(state.commit(&commit).await.unwrap());
            if n % 2 == 0 {
                let v = state.load(&call.id).await.unwrap().unwrap();
                let mut ended = call.clone();
                ended.stage = CallStage::Ended;
                assert!(state.commit(&Commit::of(&v, ended)).await.unwrap());
            }
            ids.push(call.id);
        }
        assert_eq!(state.len(), 100);
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        assert_eq!(state.load("c1").await.unwrap().unwrap().call.id, "c1");
        assert_eq!(
            state.len(),
            50,
            "the 50 ended calls are gone, the live ones stay"
        );
        assert!(state.load("c0").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn memory_call_state_conformance() {
        super::super::conformance::run_all(Arc::new(super::MemoryCallState::new()), "m-").await;
    }
}
