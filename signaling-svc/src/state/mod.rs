//! Live call state, shared by every replica: the calls ringing or
//! connected, which call each user is in, and the timers (ring timeout,
//! disconnect grace). One trait, two implementations:
//!
//! - [`RedisCallState`] (distributed mode), through `runtime::ephemeral`;
//! - [`MemoryCallState`] (all-in-one).
//!
//! Both pass the [`conformance`] suite. The state machine itself is not
//! here (it is [`crate::calls`]): a backend only loads, and applies one
//! [`Commit`] atomically or not at all. What callers rely on:
//! - a commit applies only if the call's version is still the one it was
//!   built from (a new call: no call with that id exists), and every user it
//!   claims is free — in no call, or in this one, or in one that ended — so
//!   two replicas deciding at once cannot both win (first answer, busy);
//! - a user is in at most one live call;
//! - timers are state too: they stay until a commit removes them, so a timer
//!   due while the replica that set it is dead fires on another replica;
//! - an ended call stays readable for [`ENDED_RETENTION`] (late answers and
//!   relays get a clear reply), then disappears.

mod memory;
mod redis;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

use std::time::Duration;

use async_trait::async_trait;

pub use memory::MemoryCallState;
pub use quckchat_runtime::ephemeral::StateError;
pub use redis::RedisCallState;

use crate::call::{Call, Side};

/// How long an ended call stays readable.
pub const ENDED_RETENTION: Duration = Duration::from_secs(300);

/// A call and the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub call: Call,
    pub version: u64,
}

/// Something that must happen to a call at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Nobody answered in time: `no_answer`.
    Ring,
    /// A party's device is gone; unless it comes back: `disconnected`.
    Gone(Side),
}

impl Timer {
    /// `<callId>|ring`, `<callId>|gone:caller`: how timers are named in the
    /// shared timer set.
    pub fn member(self, call_id: &str) -> String {
        match self {
            Timer::Ring => format!("{call_id}|ring"),
            Timer::Gone(side) => format!("{call_id}|gone:{}", side.as_str()),
        }
    }

    /// The inverse of [`Timer::member`].
    pub fn parse_member(member: &str) -> Option<(String, Timer)> {
        let (id, what) = member.split_once('|')?;
        let timer = match what {
            "ring" => Timer::Ring,
            _ => Timer::Gone(Side::parse(what.strip_prefix("gone:")?)?),
        };
        Some((id.to_owned(), timer))
    }

    /// Every timer a call can have.
    pub const ALL: [Timer; 3] = [
        Timer::Ring,
        Timer::Gone(Side::Caller),
        Timer::Gone(Side::Callee),
    ];
}

/// One atomic change to a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The version the change was decided from; `None`: the call is new
    /// (fails if the id exists).
    pub expect: Option<u64>,
    /// The call after the change. An ended call releases both parties and
    /// is kept for [`ENDED_RETENTION`].
    pub call: Call,
    /// Users who must be free (see the module doc) and become in this call.
    pub claim: Vec<String>,
    /// Timers to set (or move), with their due time in Unix ms.
    pub set_timers: Vec<(Timer, i64)>,
    /// Timers to remove.
    pub clear_timers: Vec<Timer>,
}

impl Commit {
    /// A change to `current`.
    pub fn of(current: &Versioned, call: Call) -> Self {
        Self {
            expect: Some(current.version),
            call,
            claim: Vec::new(),
            set_timers: Vec::new(),
            clear_timers: Vec::new(),
        }
    }

    pub fn set_timer(mut self, timer: Timer, due_ms: i64) -> Self {
        self.set_timers.push((timer, due_ms));
        self
    }

    pub fn clear_timer(mut self, timer: Timer) -> Self {
        self.clear_timers.push(timer);
        self
    }
}

#[async_trait]
pub trait CallState: Send + Sync + 'static {
    /// A call by id (live, or ended within [`ENDED_RETENTION`]).
    async fn load(&self, call_id: &str) -> Result<Option<Versioned>, StateError>;

    /// The live call `user_id` is in, if any.
    async fn active_call_id(&self, user_id: &str) -> Result<Option<String>, StateError>;

    /// Applies `commit` if its expectations hold; `false` when they did not
    /// (read again and decide again).
    async fn commit(&self, commit: &Commit) -> Result<bool, StateError>;

    /// Timers due at `now_ms`, oldest first, at most `limit`. They stay until
    /// a commit clears them (or [`CallState::drop_timer`]).
    async fn due_timers(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, Timer)>, StateError>;

    /// Removes a timer whose call no longer exists.
    async fn drop_timer(&self, call_id: &str, timer: Timer) -> Result<(), StateError>;

    /// Whether the backend answers (readiness).
    async fn ping(&self) -> Result<(), StateError>;
}
