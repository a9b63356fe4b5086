//! The call state machine: ringing → connected → ended, decided here once
//! for both backends of [`crate::state`].
//!
//! Every operation reads the call, decides the next state in Rust and
//! commits it with the version it read; when another replica (or another
//! device) changed the call in between, the commit fails and the operation
//! reads and decides again. So the first `call:answer` wins, a glare merges
//! into one call, and a user is in at most one live call, across replicas.
//!
//! Devices: a side of a call is bound to one socket (`caller_conn`, and the
//! callee's once it answered); relays go only to it. When that socket
//! leaves `webrtc:lobby` the binding is cleared and a `Gone` timer starts;
//! a socket of the same user joining within the grace takes the call over
//! (resume), otherwise the call ends `disconnected`.

use std::sync::Arc;
use std::time::Duration;

use crate::call::{new_call_id, Call, CallStage, CallType, EndReason, Side};
use crate::state::{CallState, Commit, StateError, Timer, Versioned};

/// Attempts of one operation against concurrent changes before it gives up
/// (`service unavailable`); each lost race means another change succeeded.
const MAX_ATTEMPTS: usize = 32;

/// Timers due handled per sweep.
pub const SWEEP_BATCH: usize = 256;

/// How long a call may ring and a party may be gone.
#[derive(Debug, Clone, Copy)]
pub struct CallTiming {
    /// `CALL_RING_TIMEOUT_SECS` (45).
    pub ring_timeout: Duration,
    /// `CALL_DISCONNECT_GRACE_SECS` (20).
    pub disconnect_grace: Duration,
}

impl Default for CallTiming {
    fn default() -> Self {
        Self {
            ring_timeout: Duration::from_secs(45),
            disconnect_grace: Duration::from_secs(20),
        }
    }
}

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallsError {
    #[error("no such call")]
    NotFound,
    #[error("not a party of this call, or not its device")]
    Forbidden,
    #[error("already in a call")]
    Busy,
    #[error("answered on another device")]
    AnsweredElsewhere,
    #[error("the call has ended")]
    Ended,
    #[error(transparent)]
    State(#[from] StateError),
    #[error("too many concurrent changes to one call")]
    Contended,
}

/// The socket a command came from.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub conn_id: &'a str,
}

/// What `call:initiate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initiated {
    /// A new call rings.
    Ringing(Call),
    /// Glare: the callee was already calling the caller; that call is now
    /// connected, answered by this device.
    Merged(Call),
}

/// What `call:answer` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    pub call: Call,
    /// False when this device had already answered (a retry).
    pub fresh: bool,
}

/// Who ends a call.
#[derive(Debug, Clone, Copy)]
pub enum Ender<'a> {
    /// A party, from one of their devices.
    User(&'a str),
    /// The backend or an operator (`EndCall`), with the reason to show.
    System(EndReason),
}

/// Where a relay from a device goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayTo {
    /// The peer's bound socket.
    Connection { user_id: String, conn_id: String },
    /// Every device of the callee (the caller's offer while it rings).
    User(String),
    /// The peer's device is gone for now (grace running): nothing to send.
    Away,
}

/// What a device joining `webrtc:lobby` learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejoined {
    pub call: Call,
    /// This socket is the call's device for its user (it was, or it just
    /// took the call over after its previous socket went away).
    pub on_this_device: bool,
}

pub struct Calls {
    state: Arc<dyn CallState>,
    timing: CallTiming,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `call` ended now, with every timer cleared.
fn ending(current: &Versioned, reason: EndReason, by: Option<&str>, now: i64) -> Commit {
    let mut call = current.call.clone();
    call.stage = CallStage::Ended;
    call.end_reason = Some(reason);
    call.ended_by = by.map(str::to_owned);
    call.ended_at_ms = Some(now);
    let mut commit = Commit::of(current, call);
    commit.clear_timers = Timer::ALL.to_vec();
    commit
}

/// The callee's device answers: connected.
fn answering(current: &Versioned, device: Device<'_>, now: i64) -> Commit {
    let mut call = current.call.clone();
    call.stage = CallStage::Connected;
    call.callee_device = device.device_id.to_owned();
    call.callee_conn = device.conn_id.to_owned();
    call.answered_at_ms = Some(now);
    Commit::of(current, call).clear_timer(Timer::Ring)
}

impl Calls {
    pub fn new(state: Arc<dyn CallState>, timing: CallTiming) -> Self {
        Self { state, timing }
    }

    pub fn state(&self) -> &Arc<dyn CallState> {
        &self.state
    }

    pub fn timing(&self) -> CallTiming {
        self.timing
    }

    async fn load(&self, call_id: &str) -> Result<Versioned, CallsError> {
        self.state.load(call_id).await?.ok_or(CallsError::NotFound)
    }

    /// The live call `user_id` is in.
    pub async fn active_call(&self, user_id: &str) -> Result<Option<Versioned>, CallsError> {
        let Some(id) = self.state.active_call_id(user_id).await? else {
            return Ok(None);
        };
        Ok(self.state.load(&id).await?.filter(|v| v.call.is_live()))
    }

    pub async fn call(&self, call_id: &str) -> Result<Option<Call>, CallsError> {
        Ok(self.state.load(call_id).await?.map(|v| v.call))
    }

    /// `call:initiate`: rings `callee_id`, or merges with the callee's call
    /// to the caller (glare), or refuses `busy`.
    pub async fn initiate(
        &self,
        caller: Device<'_>,
        callee_id: &str,
        call_type: CallType,
        conversation_id: Option<String>,
        now: i64,
    ) -> Result<Initiated, CallsError> {
        for _ in 0..MAX_ATTEMPTS {
            if let Some(current) = self.active_call(caller.user_id).await? {
                let c = &current.call;
                let glare = c.stage == CallStage::Ringing
                    && c.callee_id == caller.user_id
                    && c.caller_id == callee_id;
                if !glare {
                    return Err(CallsError::Busy);
                }
                let commit = answering(&current, caller, now);
                if self.state.commit(&commit).await? {
                    return Ok(Initiated::Merged(commit.call));
                }
                continue;
            }
            if self.active_call(callee_id).await?.is_some() {
                return Err(CallsError::Busy);
            }
            let call = Call::ringing(
                new_call_id(),
                caller.user_id,
                caller.device_id,
                caller.conn_id,
                callee_id,
                call_type,
                conversation_id.clone(),
                now,
            );
            let commit = Commit {
                expect: None,
                claim: vec![caller.user_id.to_owned(), callee_id.to_owned()],
                set_timers: vec![(Timer::Ring, now + ms(self.timing.ring_timeout))],
                clear_timers: Vec::new(),
                call,
            };
            if self.state.commit(&commit).await? {
                return Ok(Initiated::Ringing(commit.call));
            }
            // Someone became busy (or glare) meanwhile: decide again.
        }
        Err(CallsError::Contended)
    }

    /// `call:answer` from one of the callee's devices: the first wins.
    pub async fn answer(
        &self,
        call_id: &str,
        device: Device<'_>,
        now: i64,
    ) -> Result<Answered, CallsError> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.load(call_id).await?;
            let c = &current.call;
            if c.side_of(device.user_id) != Some(Side::Callee) {
                return Err(CallsError::Forbidden);
            }
            match c.stage {
                CallStage::Ended => return Err(CallsError::Ended),
                CallStage::Connected if c.callee_conn == device.conn_id => {
                    return Ok(Answered {
                        call: current.call,
                        fresh: false,
                    })
                }
                CallStage::Connected => return Err(CallsError::AnsweredElsewhere),
                CallStage::Ringing => {
                    let commit = answering(&current, device, now);
                    if self.state.commit(&commit).await? {
                        return Ok(Answered {
                            call: commit.call,
                            fresh: true,
                        });
                    }
                }
            }
        }
        Err(CallsError::Contended)
    }

    /// `call:reject` from one of the callee's devices: ends a ringing call
    /// for all of them. `None`: it had already ended (nothing to tell).
    pub async fn reject(
        &self,
        call_id: &str,
        device: Device<'_>,
        now: i64,
    ) -> Result<Option<Call>, CallsError> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.load(call_id).await?;
            let c = &current.call;
            if c.side_of(device.user_id) != Some(Side::Callee) {
                return Err(CallsError::Forbidden);
            }
            let commit = match c.stage {
                CallStage::Ended => return Ok(None),
                CallStage::Connected if c.callee_conn != device.conn_id => {
                    return Err(CallsError::AnsweredElsewhere)
                }
                // The device in the call declines it: hang up.
                CallStage::Connected => {
                    ending(&current, EndReason::Hangup, Some(device.user_id), now)
                }
                CallStage::Ringing => {
                    ending(&current, EndReason::Rejected, Some(device.user_id), now)
                }
            };
            if self.state.commit(&commit).await? {
                return Ok(Some(commit.call));
            }
        }
        Err(CallsError::Contended)
    }

    /// `call:end` (a party) or `EndCall` (the system). Ringing: the caller
    /// cancels, the callee rejects; connected: hangup. `None`: it had
    /// already ended.
    pub async fn end(
        &self,
        call_id: &str,
        by: Ender<'_>,
        now: i64,
    ) -> Result<Option<Call>, CallsError> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.load(call_id).await?;
            let c = &current.call;
            if c.stage == CallStage::Ended {
                return Ok(None);
            }
            let commit = match by {
                Ender::System(reason) => ending(&current, reason, None, now),
                Ender::User(user) => {
                    let reason = match (c.side_of(user), c.stage) {
                        (None, _) => return Err(CallsError::Forbidden),
                        (Some(_), CallStage::Connected) => EndReason::Hangup,
                        (Some(Side::Caller), _) => EndReason::Cancelled,
                        (Some(Side::Callee), _) => EndReason::Rejected,
                    };
                    ending(&current, reason, Some(user), now)
                }
            };
            if self.state.commit(&commit).await? {
                return Ok(Some(commit.call));
            }
        }
        Err(CallsError::Contended)
    }

    /// Where a relay (`webrtc:offer|answer|ice-candidate`) from `device`
    /// goes: only between the call's two devices; while it rings, from the
    /// caller's device to every device of the callee.
    pub async fn relay_target(
        &self,
        call_id: &str,
        device: Device<'_>,
    ) -> Result<(Call, RelayTo), CallsError> {
        let current = self.load(call_id).await?;
        let c = current.call;
        let Some(side) = c.side_of(device.user_id) else {
            return Err(CallsError::Forbidden);
        };
        if c.stage == CallStage::Ended {
            return Err(CallsError::Ended);
        }
        if c.conn_of(side) != device.conn_id {
            return Err(CallsError::Forbidden);
        }
        let peer = c.peer_of(side).to_owned();
        let to = match (side, c.stage) {
            (Side::Caller, CallStage::Ringing) => RelayTo::User(peer),
            _ => match c.conn_of(match side {
                Side::Caller => Side::Callee,
                Side::Callee => Side::Caller,
            }) {
                "" => RelayTo::Away,
                conn => RelayTo::Connection {
                    user_id: peer,
                    conn_id: conn.to_owned(),
                },
            },
        };
        Ok((c, to))
    }

    /// A socket of `user_id` joined `webrtc:lobby`: if the user's side of
    /// their call has no device (it went away), this socket takes it over.
    pub async fn joined(&self, device: Device<'_>) -> Result<Option<Rejoined>, CallsError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some(current) = self.active_call(device.user_id).await? else {
                return Ok(None);
            };
            let c = &current.call;
            let Some(side) = c.side_of(device.user_id) else {
                return Ok(None);
            };
            let bound = c.conn_of(side);
            let takes_over =
                bound.is_empty() && (side == Side::Caller || c.stage == CallStage::Connected);
            if !takes_over {
                let on_this_device = bound == device.conn_id;
                return Ok(Some(Rejoined {
                    call: current.call,
                    on_this_device,
                }));
            }
            let mut call = current.call.clone();
            match side {
                Side::Caller => {
                    call.caller_conn = device.conn_id.to_owned();
                    call.caller_device = device.device_id.to_owned();
                }
                Side::Callee => {
                    call.callee_conn = device.conn_id.to_owned();
                    call.callee_device = device.device_id.to_owned();
                }
            }
            let commit = Commit::of(&current, call).clear_timer(Timer::Gone(side));
            if self.state.commit(&commit).await? {
                return Ok(Some(Rejoined {
                    call: commit.call,
                    on_this_device: true,
                }));
            }
        }
        Err(CallsError::Contended)
    }

    /// A socket of `user_id` left `webrtc:lobby` (or closed): if it was the
    /// device of their side of a call, the call waits for it at most the
    /// disconnect grace. Returns whether a call now waits.
    pub async fn left(&self, device: Device<'_>, now: i64) -> Result<bool, CallsError> {
        self.gone(
            device.user_id,
            Some(device.conn_id),
            now + ms(self.timing.disconnect_grace),
        )
        .await
    }

    /// Presence says `user_id` has no connection left (e.g. their gateway
    /// died without telling anyone): their side of a call is gone, and the
    /// grace has already passed in presence.
    pub async fn offline(&self, user_id: &str, now: i64) -> Result<bool, CallsError> {
        self.gone(user_id, None, now).await
    }

    async fn gone(&self, user_id: &str, conn: Option<&str>, due: i64) -> Result<bool, CallsError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some(current) = self.active_call(user_id).await? else {
                return Ok(false);
            };
            let Some(side) = current.call.side_of(user_id) else {
                return Ok(false);
            };
            let bound = current.call.conn_of(side);
            if bound.is_empty() || conn.is_some_and(|c| c != bound) {
                return Ok(false);
            }
            let mut call = current.call.clone();
            match side {
                Side::Caller => call.caller_conn.clear(),
                Side::Callee => call.callee_conn.clear(),
            }
            let commit = Commit::of(&current, call).set_timer(Timer::Gone(side), due);
            if self.state.commit(&commit).await? {
                return Ok(true);
            }
        }
        Err(CallsError::Contended)
    }

    /// Fires the timers due at `now`: returns the calls that ended
    /// (`no_answer`, `disconnected`). A timer stays until its call's commit
    /// clears it, so a replica dying here loses nothing: another fires it.
    pub async fn fire_due(&self, now: i64) -> Result<Vec<Call>, CallsError> {
        let mut ended = Vec::new();
        for (call_id, timer) in self.state.due_timers(now, SWEEP_BATCH).await? {
            let Some(current) = self.state.load(&call_id).await? else {
                self.state.drop_timer(&call_id, timer).await?;
                continue;
            };
            let c = &current.call;
            let commit = match timer {
                Timer::Ring if c.stage == CallStage::Ringing => {
                    ending(&current, EndReason::NoAnswer, None, now)
                }
                Timer::Gone(side) if c.is_live() && c.conn_of(side).is_empty() => {
                    let who = match side {
                        Side::Caller => c.caller_id.clone(),
                        Side::Callee => c.callee_id.clone(),
                    };
                    ending(&current, EndReason::Disconnected, Some(&who), now)
                }
                // Stale (the call moved on without clearing it).
                _ => Commit::of(&current, current.call.clone()).clear_timer(timer),
            };
            // Lost race: another replica or a client changed it; the timer,
            // if still valid, is due again at the next sweep.
            let was_live = c.is_live();
            if self.state.commit(&commit).await? && was_live && !commit.call.is_live() {
                ended.push(commit.call);
            }
        }
        Ok(ended)
    }
}
