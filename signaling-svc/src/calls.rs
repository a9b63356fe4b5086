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
//! (resume), otherwise the call ends `disconnected`. A socket of the same
//! device (same `deviceId`) takes it over at once, even before its old
//! socket is noticed gone; the old socket's later leave changes nothing.

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
            let bound_device = match side {
                Side::Caller => &c.caller_device,
                Side::Callee => &c.callee_device,
            };
            let has_device = side == Side::Caller || c.stage == CallStage::Connected;
            // Its device gone, or the same device back on a new socket before
            // its old one was noticed closed (mobile networks).
            let takes_over = has_device
                && (bound.is_empty()
                    || (bound != device.conn_id
                        && !device.device_id.is_empty()
                        && *bound_device == device.device_id));
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::state::MemoryCallState;

    const RING: i64 = 45_000;
    const GRACE: i64 = 20_000;

    fn calls() -> Calls {
        Calls::new(
            Arc::new(MemoryCallState::new()),
            CallTiming {
                ring_timeout: Duration::from_millis(RING as u64),
                disconnect_grace: Duration::from_millis(GRACE as u64),
            },
        )
    }

    fn dev<'a>(user: &'a str, conn: &'a str) -> Device<'a> {
        Device {
            user_id: user,
            device_id: conn,
            conn_id: conn,
        }
    }

    async fn ring(c: &Calls, caller: &str, callee: &str, now: i64) -> Call {
        match c
            .initiate(
                dev(caller, &format!("{caller}1")),
                callee,
                CallType::Audio,
                None,
                now,
            )
            .await
            .unwrap()
        {
            Initiated::Ringing(call) => call,
            other => panic!("{other:?}"),
        }
    }

    async fn connected(c: &Calls) -> Call {
        let call = ring(c, "a", "b", 0).await;
        c.answer(&call.id, dev("b", "b1"), 1_000)
            .await
            .unwrap()
            .call
    }

    #[tokio::test]
    async fn initiate_rings_and_makes_both_busy() {
        let c = calls();
        let call = ring(&c, "a", "b", 0).await;
        assert_eq!(call.stage, CallStage::Ringing);
        assert_eq!(
            (call.caller_conn.as_str(), call.callee_conn.as_str()),
            ("a1", "")
        );
        for (caller, callee) in [("c", "b"), ("c", "a"), ("a", "c"), ("b", "c")] {
            let err = c
                .initiate(dev(caller, "x"), callee, CallType::Video, None, 10)
                .await
                .unwrap_err();
            assert_eq!(err, CallsError::Busy, "{caller} → {callee}");
        }
        // Calling the same callee again from another device of the caller.
        let err = c
            .initiate(dev("a", "a2"), "b", CallType::Audio, None, 10)
            .await
            .unwrap_err();
        assert_eq!(err, CallsError::Busy);
    }

    #[tokio::test]
    async fn glare_merges_into_the_first_call() {
        let c = calls();
        let first = ring(&c, "a", "b", 0).await;
        let merged = c
            .initiate(dev("b", "b9"), "a", CallType::Video, None, 500)
            .await
            .unwrap();
        let Initiated::Merged(call) = merged else {
            panic!("{merged:?}")
        };
        assert_eq!(call.id, first.id);
        assert_eq!(call.stage, CallStage::Connected);
        assert_eq!(call.callee_conn, "b9");
        assert_eq!(call.call_type, CallType::Audio, "the first call's type");
        assert_eq!(call.answered_at_ms, Some(500));
        // The ring timer is gone: nothing fires.
        assert!(c.fire_due(RING * 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn first_answer_wins_and_retries_are_idempotent() {
        let c = calls();
        let call = ring(&c, "a", "b", 0).await;
        let first = c.answer(&call.id, dev("b", "b1"), 100).await.unwrap();
        assert!(first.fresh);
        assert_eq!(first.call.stage, CallStage::Connected);
        let again = c.answer(&call.id, dev("b", "b1"), 200).await.unwrap();
        assert!(!again.fresh);
        assert_eq!(again.call.answered_at_ms, Some(100));
        assert_eq!(
            c.answer(&call.id, dev("b", "b2"), 300).await.unwrap_err(),
            CallsError::AnsweredElsewhere
        );
        assert_eq!(
            c.answer(&call.id, dev("a", "a1"), 300).await.unwrap_err(),
            CallsError::Forbidden
        );
        assert_eq!(
            c.answer(&call.id, dev("z", "z1"), 300).await.unwrap_err(),
            CallsError::Forbidden
        );
        assert_eq!(
            c.answer("000000000000000000000000", dev("b", "b1"), 300)
                .await
                .unwrap_err(),
            CallsError::NotFound
        );
    }

    #[tokio::test]
    async fn concurrent_answers_from_two_devices_have_one_winner() {
        let c = Arc::new(calls());
        for round in 0..20 {
            let call = ring(&c, "a", "b", round).await;
            let tasks: Vec<_> = ["b1", "b2", "b3"]
                .into_iter()
                .map(|conn| {
                    let (c, id) = (c.clone(), call.id.clone());
                    tokio::spawn(async move { c.answer(&id, dev("b", conn), 1).await })
                })
                .collect();
            let mut winners = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(a) => winners += usize::from(a.fresh),
                    Err(e) => assert_eq!(e, CallsError::AnsweredElsewhere),
                }
            }
            assert_eq!(winners, 1);
            c.end(&call.id, Ender::User("a"), 2).await.unwrap();
        }
    }

    #[tokio::test]
    async fn reject_ends_a_ringing_call_for_every_device() {
        let c = calls();
        let call = ring(&c, "a", "b", 0).await;
        assert_eq!(
            c.reject(&call.id, dev("a", "a1"), 1).await.unwrap_err(),
            CallsError::Forbidden,
            "the caller cancels with call:end"
        );
        let ended = c
            .reject(&call.id, dev("b", "b2"), 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended.end_reason, Some(EndReason::Rejected));
        assert_eq!(ended.ended_by.as_deref(), Some("b"));
        assert_eq!(ended.duration_ms(), None);
        // Rejecting again, from another device: already over, nothing to tell.
        assert_eq!(c.reject(&call.id, dev("b", "b1"), 20).await.unwrap(), None);
        assert_eq!(c.active_call("a").await.unwrap(), None);
        assert_eq!(c.active_call("b").await.unwrap(), None);
        assert_eq!(
            c.answer(&call.id, dev("b", "b1"), 30).await.unwrap_err(),
            CallsError::Ended
        );
    }

    #[tokio::test]
    async fn reject_after_the_answer() {
        let c = calls();
        let call = connected(&c).await;
        assert_eq!(
            c.reject(&call.id, dev("b", "b2"), 2_000).await.unwrap_err(),
            CallsError::AnsweredElsewhere
        );
        let ended = c
            .reject(&call.id, dev("b", "b1"), 3_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended.end_reason, Some(EndReason::Hangup));
        assert_eq!(ended.duration_ms(), Some(2_000));
    }

    #[tokio::test]
    async fn end_cancels_rejects_or_hangs_up() {
        let c = calls();
        let call = ring(&c, "a", "b", 0).await;
        let ended = c.end(&call.id, Ender::User("a"), 5).await.unwrap().unwrap();
        assert_eq!(ended.end_reason, Some(EndReason::Cancelled));
        assert_eq!(c.end(&call.id, Ender::User("a"), 6).await.unwrap(), None);

        let call = ring(&c, "a", "b", 10).await;
        let ended = c
            .end(&call.id, Ender::User("b"), 15)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended.end_reason, Some(EndReason::Rejected));

        let call = connected(&c).await;
        assert_eq!(
            c.end(&call.id, Ender::User("z"), 2_000).await.unwrap_err(),
            CallsError::Forbidden
        );
        let ended = c
            .end(&call.id, Ender::User("b"), 61_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended.end_reason, Some(EndReason::Hangup));
        assert_eq!(ended.ended_by.as_deref(), Some("b"));
        assert_eq!(ended.duration_ms(), Some(60_000));

        let call = connected(&c).await;
        let ended = c
            .end(&call.id, Ender::System(EndReason::Failed), 2_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (ended.end_reason, ended.ended_by),
            (Some(EndReason::Failed), None)
        );
    }

    #[tokio::test]
    async fn an_unanswered_call_ends_no_answer_at_the_timeout() {
        let c = calls();
        let call = ring(&c, "a", "b", 0).await;
        assert!(c.fire_due(RING - 1).await.unwrap().is_empty());
        let ended = c.fire_due(RING).await.unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, call.id);
        assert_eq!(ended[0].end_reason, Some(EndReason::NoAnswer));
        assert_eq!(ended[0].ended_by, None);
        assert!(c.fire_due(RING * 2).await.unwrap().is_empty(), "once");
        assert_eq!(c.active_call("b").await.unwrap(), None);
    }

    #[tokio::test]
    async fn relays_go_only_between_the_two_devices() {
        let c = calls();
        let call = ring(&c, "a", "b", 0).await;
        // Ringing: the caller's device reaches every device of the callee.
        let (_, to) = c.relay_target(&call.id, dev("a", "a1")).await.unwrap();
        assert_eq!(to, RelayTo::User("b".into()));
        for d in [dev("b", "b1"), dev("a", "a2"), dev("z", "z1")] {
            assert_eq!(
                c.relay_target(&call.id, d).await.unwrap_err(),
                CallsError::Forbidden,
                "{d:?}"
            );
        }
        c.answer(&call.id, dev("b", "b1"), 10).await.unwrap();
        let (_, to) = c.relay_target(&call.id, dev("a", "a1")).await.unwrap();
        assert_eq!(
            to,
            RelayTo::Connection {
                user_id: "b".into(),
                conn_id: "b1".into()
            }
        );
        let (_, to) = c.relay_target(&call.id, dev("b", "b1")).await.unwrap();
        assert_eq!(
            to,
            RelayTo::Connection {
                user_id: "a".into(),
                conn_id: "a1".into()
            }
        );
        assert_eq!(
            c.relay_target(&call.id, dev("b", "b2")).await.unwrap_err(),
            CallsError::Forbidden
        );
        c.end(&call.id, Ender::User("a"), 20).await.unwrap();
        assert_eq!(
            c.relay_target(&call.id, dev("a", "a1")).await.unwrap_err(),
            CallsError::Ended
        );
    }

    #[tokio::test]
    async fn a_device_that_comes_back_within_the_grace_resumes() {
        let c = calls();
        let call = connected(&c).await;
        // Another device of b leaving changes nothing.
        assert!(!c.left(dev("b", "b2"), 2_000).await.unwrap());
        assert!(c.left(dev("b", "b1"), 2_000).await.unwrap());
        let (_, to) = c.relay_target(&call.id, dev("a", "a1")).await.unwrap();
        assert_eq!(to, RelayTo::Away);
        // Not yet: the grace runs.
        assert!(c.fire_due(2_000 + GRACE - 1).await.unwrap().is_empty());
        // a's other device joining does not take a's side (a1 is there).
        let seen = c.joined(dev("a", "a2")).await.unwrap().unwrap();
        assert!(!seen.on_this_device);
        // b's new socket takes the call over.
        let back = c.joined(dev("b", "b7")).await.unwrap().unwrap();
        assert!(back.on_this_device);
        assert_eq!(back.call.callee_conn, "b7");
        assert!(c.fire_due(2_000 + GRACE * 5).await.unwrap().is_empty());
        let (_, to) = c.relay_target(&call.id, dev("a", "a1")).await.unwrap();
        assert_eq!(
            to,
            RelayTo::Connection {
                user_id: "b".into(),
                conn_id: "b7".into()
            }
        );
    }

    #[tokio::test]
    async fn the_same_device_on_a_new_socket_takes_over_before_the_old_one_closes() {
        let c = calls();
        let call = connected(&c).await;
        // b1's device ("b1", see `dev`) reconnects as socket b1-new.
        let back = c
            .joined(Device {
                user_id: "b",
                device_id: "b1",
                conn_id: "b1-new",
            })
            .await
            .unwrap()
            .unwrap();
        assert!(back.on_this_device);
        assert_eq!(back.call.callee_conn, "b1-new");
        // The old socket closing later does not start the grace.
        assert!(!c.left(dev("b", "b1"), 5_000).await.unwrap());
        assert!(c.fire_due(5_000 + GRACE * 2).await.unwrap().is_empty());
        assert!(c.active_call("b").await.unwrap().is_some());
        // Another device of b does not take over a bound call.
        let other = c.joined(dev("b", "b2")).await.unwrap().unwrap();
        assert!(!other.on_this_device);
        assert_eq!(
            c.call(&call.id).await.unwrap().unwrap().callee_conn,
            "b1-new"
        );
    }

    #[tokio::test]
    async fn a_device_gone_past_the_grace_ends_the_call_disconnected() {
        let c = calls();
        let call = connected(&c).await;
        assert!(c.left(dev("a", "a1"), 5_000).await.unwrap());
        let ended = c.fire_due(5_000 + GRACE).await.unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, call.id);
        assert_eq!(ended[0].end_reason, Some(EndReason::Disconnected));
        assert_eq!(ended[0].ended_by.as_deref(), Some("a"));
        assert_eq!(ended[0].duration_ms(), Some(4_000 + GRACE as u64));
        assert!(c.joined(dev("a", "a3")).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_caller_gone_while_ringing_ends_it_and_a_callee_socket_does_not_count() {
        let c = calls();
        let call = ring(&c, "a", "b", 0).await;
        // The callee's sockets are not bound while it rings.
        assert!(!c.left(dev("b", "b1"), 10).await.unwrap());
        let seen = c.joined(dev("b", "b3")).await.unwrap().unwrap();
        assert!(!seen.on_this_device, "ringing: no callee device yet");
        assert_eq!(seen.call.stage, CallStage::Ringing);
        assert!(c.left(dev("a", "a1"), 100).await.unwrap());
        let ended = c.fire_due(100 + GRACE).await.unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, call.id);
        assert_eq!(ended[0].end_reason, Some(EndReason::Disconnected));
    }

    #[tokio::test]
    async fn presence_offline_ends_the_call_at_the_next_sweep() {
        let c = calls();
        let call = connected(&c).await;
        assert!(!c.offline("nobody", 3_000).await.unwrap());
        assert!(c.offline("b", 3_000).await.unwrap());
        let ended = c.fire_due(3_000).await.unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, call.id);
        assert_eq!(ended[0].end_reason, Some(EndReason::Disconnected));
        assert_eq!(ended[0].ended_by.as_deref(), Some("b"));
    }
}
