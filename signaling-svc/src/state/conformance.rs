//! The one suite every [`CallState`] passes (memory, and real Redis).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use super::{CallState, Commit, Timer, Versioned};
use crate::call::{new_call_id, Call, CallStage, CallType, EndReason, Side};

fn ringing(caller: &str, callee: &str, at: i64) -> Call {
    Call::ringing(
        new_call_id(),
        caller,
        "dev-a",
        "conn-a",
        callee,
        CallType::Video,
        Some("conv1".into()),
        at,
    )
}

fn create(call: &Call) -> Commit {
    Commit {
        expect: None,
        call: call.clone(),
        claim: vec![call.caller_id.clone(), call.callee_id.clone()],
        set_timers: vec![(Timer::Ring, call.created_at_ms + 45_000)],
        clear_timers: Vec::new(),
    }
}

fn ended(mut call: Call, at: i64) -> Call {
    call.stage = CallStage::Ended;
    call.ended_at_ms = Some(at);
    call.end_reason = Some(EndReason::Hangup);
    call
}

/// Runs every case; `users` makes user ids unique to this run.
pub async fn run_all(state: Arc<dyn CallState>, users: &str) {
    let u = |n: &str| format!("{users}{n}");
    creating_claims_both_users_once(state.as_ref(), &u("a"), &u("b"), &u("c")).await;
    versions_let_one_of_two_racing_commits_win(state.clone(), &u("d"), &u("e")).await;
    ending_frees_the_users_and_keeps_the_call(state.as_ref(), &u("f"), &u("g")).await;
    timers_are_due_in_order_until_cleared(state.as_ref(), &u("h"), &u("i")).await;
    unknown_calls_and_users_are_absent(state.as_ref(), &u("nobody")).await;
    state.ping().await.unwrap();
}

async fn creating_claims_both_users_once(state: &dyn CallState, a: &str, b: &str, c: &str) {
    let call = ringing(a, b, 1_000);
    assert!(state.commit(&create(&call)).await.unwrap());
    assert_eq!(
        state.load(&call.id).await.unwrap(),
        Some(Versioned {
            call: call.clone(),
            version: 1
        })
    );
    assert_eq!(
        state.active_call_id(a).await.unwrap(),
        Some(call.id.clone())
    );
    assert_eq!(
        state.active_call_id(b).await.unwrap(),
        Some(call.id.clone())
    );
    // The same id again: exists.
    assert!(!state.commit(&create(&call)).await.unwrap());
    // c calling b: b is busy, and nothing of the refused call is kept.
    let other = ringing(c, b, 2_000);
    assert!(!state.commit(&create(&other)).await.unwrap());
    assert_eq!(state.load(&other.id).await.unwrap(), None);
    assert_eq!(state.active_call_id(c).await.unwrap(), None);
    // Clean up: end it.
    let v = state.load(&call.id).await.unwrap().unwrap();
    let end = Commit::of(&v, ended(call.clone(), 3_000))
        .clear_timer(Timer::Ring)
        .clear_timer(Timer::Gone(Side::Caller));
    assert!(state.commit(&end).await.unwrap());
    // Now c can call b.
    assert!(state.commit(&create(&other)).await.unwrap());
    let v = state.load(&other.id).await.unwrap().unwrap();
    assert!(state
        .commit(&Commit::of(&v, ended(other.clone(), 4_000)).clear_timer(Timer::Ring))
        .await
        .unwrap());
}

async fn versions_let_one_of_two_racing_commits_win(state: Arc<dyn CallState>, a: &str, b: &str) {
    let call = ringing(a, b, 1_000);
    assert!(state.commit(&create(&call)).await.unwrap());
    let read = state.load(&call.id).await.unwrap().unwrap();
    // Two devices answer from the same read, at once.
    let answers = (1..=2).map(|n| {
        let state = state.clone();
        let mut answered = read.call.clone();
        answered.stage = CallStage::Connected;
        answered.callee_device = format!("dev-b{n}");
        answered.callee_conn = format!("conn-b{n}");
        answered.answered_at_ms = Some(2_000);
        let commit = Commit::of(&read, answered).clear_timer(Timer::Ring);
        tokio::spawn(async move { state.commit(&commit).await.unwrap() })
    });
    let mut won = 0;
    for a in answers {
        won += usize::from(a.await.unwrap());
    }
    assert_eq!(won, 1, "exactly one answer wins");
    let now = state.load(&call.id).await.unwrap().unwrap();
    assert_eq!(now.version, 2);
    assert_eq!(now.call.stage, CallStage::Connected);
    assert!(now.call.callee_conn.starts_with("conn-b"));
    // A stale commit (version 1) fails.
    assert!(!state
        .commit(&Commit::of(&read, ended(read.call.clone(), 3_000)))
        .await
        .unwrap());
    assert!(state
        .commit(&Commit::of(&now, ended(now.call.clone(), 3_000)))
        .await
        .unwrap());
}

async fn ending_frees_the_users_and_keeps_the_call(state: &dyn CallState, a: &str, b: &str) {
    let call = ringing(a, b, 1_000);
    assert!(state.commit(&create(&call)).await.unwrap());
    let v = state.load(&call.id).await.unwrap().unwrap();
    let done = ended(call.clone(), 2_000);
    assert!(state
        .commit(&Commit::of(&v, done.clone()).clear_timer(Timer::Ring))
        .await
        .unwrap());
    assert_eq!(state.active_call_id(a).await.unwrap(), None);
    assert_eq!(state.active_call_id(b).await.unwrap(), None);
    let kept = state.load(&call.id).await.unwrap().unwrap();
    assert_eq!((kept.call, kept.version), (done, 2));
    // A user whose mapping points at an ended call is free.
    let again = ringing(b, a, 5_000);
    assert!(state.commit(&create(&again)).await.unwrap());
    assert_eq!(
        state.active_call_id(a).await.unwrap(),
        Some(again.id.clone())
    );
    let v = state.load(&again.id).await.unwrap().unwrap();
    assert!(state
        .commit(&Commit::of(&v, ended(again.clone(), 6_000)).clear_timer(Timer::Ring))
        .await
        .unwrap());
}

async fn timers_are_due_in_order_until_cleared(state: &dyn CallState, a: &str, b: &str) {
    // Far in the past, so they sort before every other run's timers.
    let call = ringing(a, b, -10_000_000);
    let mut commit = create(&call);
    commit.set_timers = vec![(Timer::Ring, -9_000_000)];
    assert!(state.commit(&commit).await.unwrap());
    let due = state.due_timers(-9_500_000, 100).await.unwrap();
    assert!(!due.iter().any(|(id, _)| *id == call.id), "not due yet");
    let due = state.due_timers(-9_000_000, 100).await.unwrap();
    assert!(due.contains(&(call.id.clone(), Timer::Ring)), "{due:?}");
    // Still there until cleared: another reader sees it too.
    let again = state.due_timers(-9_000_000, 100).await.unwrap();
    assert!(again.contains(&(call.id.clone(), Timer::Ring)));
    // Moving a timer and adding another, in one commit.
    let v = state.load(&call.id).await.unwrap().unwrap();
    let mut answered = call.clone();
    answered.stage = CallStage::Connected;
    let commit = Commit::of(&v, answered.clone())
        .clear_timer(Timer::Ring)
        .set_timer(Timer::Gone(Side::Callee), -8_000_000)
        .set_timer(Timer::Gone(Side::Caller), -8_500_000);
    assert!(state.commit(&commit).await.unwrap());
    let due: Vec<_> = state
        .due_timers(-7_000_000, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|(id, _)| *id == call.id)
        .collect();
    assert_eq!(
        due,
        vec![
            (call.id.clone(), Timer::Gone(Side::Caller)),
            (call.id.clone(), Timer::Gone(Side::Callee)),
        ]
    );
    // Setting an existing timer moves it.
    let v = state.load(&call.id).await.unwrap().unwrap();
    let commit =
        Commit::of(&v, answered.clone()).set_timer(Timer::Gone(Side::Caller), i64::MAX / 2);
    assert!(state.commit(&commit).await.unwrap());
    let due = state.due_timers(-7_000_000, 1000).await.unwrap();
    assert!(!due.contains(&(call.id.clone(), Timer::Gone(Side::Caller))));
    assert!(due.contains(&(call.id.clone(), Timer::Gone(Side::Callee))));
    // Dropping one, then ending clears the rest.
    state
        .drop_timer(&call.id, Timer::Gone(Side::Callee))
        .await
        .unwrap();
    let due = state.due_timers(-7_000_000, 1000).await.unwrap();
    assert!(!due.iter().any(|(id, _)| *id == call.id));
    let v = state.load(&call.id).await.unwrap().unwrap();
    let commit = Commit::of(&v, ended(answered, -6_000_000)).clear_timer(Timer::Gone(Side::Caller));
    assert!(state.commit(&commit).await.unwrap());
    let due = state.due_timers(i64::MAX / 2, 100_000).await.unwrap();
    assert!(!due.iter().any(|(id, _)| *id == call.id));
}

async fn unknown_calls_and_users_are_absent(state: &dyn CallState, nobody: &str) {
    assert_eq!(state.load("000000000000000000000000").await.unwrap(), None);
    assert_eq!(state.active_call_id(nobody).await.unwrap(), None);
    // A change to a call that does not exist fails.
    let call = ringing(nobody, "x", 0);
    let ghost = Versioned {
        call: call.clone(),
        version: 1,
    };
    assert!(!state.commit(&Commit::of(&ghost, call)).await.unwrap());
}
