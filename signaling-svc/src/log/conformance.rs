//! The call log conformance suite: what every [`CallLog`] must do. Run
//! against the embedded log and a real MongoDB-wire server. User and call
//! ids are random, so runs can share a database.
//!
//! The log keeps no live socket ids: `caller_conn` and `callee_conn` read
//! back empty whatever was recorded.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed step is a failed test"
)]

use std::collections::HashSet;

use super::{CallLog, Cursor, MAX_PAGE};
use crate::call::{Call, CallStage, CallType, EndReason};

pub async fn run_all(log: &dyn CallLog) {
    unknown_call_is_none(log).await;
    every_field_round_trips(log).await;
    every_end_reason_round_trips(log).await;
    stages_move_forward(log).await;
    never_goes_back(log).await;
    same_stage_twice_keeps_the_first(log).await;
    calls_of_lists_both_sides_newest_first(log).await;
    calls_of_breaks_ties_by_id_and_resumes_after_the_cursor(log).await;
    pages_return_each_call_exactly_once(log).await;
    limit_is_capped_and_zero_is_empty(log).await;
    log.ping().await.expect("ping");
}

fn id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// A ringing call with live socket ids set (the log must not keep them).
pub fn ringing(caller: &str, callee: &str, call_type: CallType, created_at_ms: i64) -> Call {
    Call::ringing(
        id("call"),
        caller,
        &format!("dev-{caller}"),
        &format!("conn-{caller}"),
        callee,
        call_type,
        None,
        created_at_ms,
    )
}

/// `call` answered on the callee's device at `at_ms`.
pub fn connected(call: &Call, at_ms: i64) -> Call {
    Call {
        stage: CallStage::Connected,
        callee_device: format!("dev-{}", call.callee_id),
        callee_conn: format!("conn-{}", call.callee_id),
        answered_at_ms: Some(at_ms),
        ..call.clone()
    }
}

/// `call` ended at `at_ms`.
pub fn ended(call: &Call, at_ms: i64, reason: EndReason, by: Option<&str>) -> Call {
    Call {
        stage: CallStage::Ended,
        ended_at_ms: Some(at_ms),
        end_reason: Some(reason),
        ended_by: by.map(str::to_owned),
        ..call.clone()
    }
}

/// What the log gives back for `call`: everything but the socket ids.
pub fn as_logged(call: &Call) -> Call {
    Call {
        caller_conn: String::new(),
        callee_conn: String::new(),
        ..call.clone()
    }
}

async fn read(log: &dyn CallLog, id: &str) -> Call {
    log.call(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("call {id} was recorded but is not found"))
}

async fn record_all(log: &dyn CallLog, calls: &[Call]) {
    for c in calls {
        log.record(c).await.unwrap();
    }
}

fn ids(calls: &[Call]) -> Vec<String> {
    calls.iter().map(|c| c.id.clone()).collect()
}

/// Newest first: `created_at_ms` descending, then id descending.
fn newest_first(calls: &[Call]) -> Vec<String> {
    let mut sorted = calls.to_vec();
    sorted.sort_by(|a, b| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
    ids(&sorted)
}

pub async fn unknown_call_is_none(log: &dyn CallLog) {
    assert_eq!(log.call(&id("nope")).await.unwrap(), None);
    assert_eq!(log.call("").await.unwrap(), None);
}

pub async fn every_field_round_trips(log: &dyn CallLog) {
    let (a, b) = (id("u"), id("u"));
    // Ringing, audio, no conversation.
    let audio = ringing(&a, &b, CallType::Audio, 1_700_000_000_123);
    log.record(&audio).await.unwrap();
    let got = read(log, &audio.id).await;
    assert_eq!(got, as_logged(&audio));
    assert_eq!(
        (got.caller_conn.as_str(), got.callee_conn.as_str()),
        ("", ""),
        "the log keeps no socket ids"
    );
    assert_eq!(got.callee_device, "");
    assert_eq!(
        (
            got.answered_at_ms,
            got.ended_at_ms,
            got.end_reason,
            got.ended_by.as_deref()
        ),
        (None, None, None, None)
    );

    // Video with a conversation, every option set, answered and hung up.
    let mut video = ringing(&b, &a, CallType::Video, 1_700_000_001_000);
    video.conversation_id = Some(id("conv"));
    let video = ended(
        &connected(&video, 1_700_000_002_500),
        1_700_000_062_750,
        EndReason::Hangup,
        Some(&a),
    );
    log.record(&video).await.unwrap();
    let got = read(log, &video.id).await;
    assert_eq!(got, as_logged(&video));
    assert_eq!(got.call_type, CallType::Video);
    assert_eq!(got.stage, CallStage::Ended);
    assert_eq!(got.conversation_id, video.conversation_id);
    assert_eq!(got.callee_device, format!("dev-{a}"));
    assert_eq!(got.caller_device, format!("dev-{b}"));
    assert_eq!(got.created_at_ms, 1_700_000_001_000);
    assert_eq!(got.answered_at_ms, Some(1_700_000_002_500));
    assert_eq!(got.ended_at_ms, Some(1_700_000_062_750));
    assert_eq!(got.end_reason, Some(EndReason::Hangup));
    assert_eq!(got.ended_by.as_deref(), Some(a.as_str()));
    assert_eq!(got.duration_ms(), Some(60_250));

    // Connected, not ended.
    let talking = connected(
        &ringing(&a, &b, CallType::Audio, 1_700_000_003_000),
        1_700_000_003_001,
    );
    log.record(&talking).await.unwrap();
    assert_eq!(read(log, &talking.id).await, as_logged(&talking));

    // The first call is still as it was.
    assert_eq!(read(log, &audio.id).await, as_logged(&audio));
}

pub async fn every_end_reason_round_trips(log: &dyn CallLog) {
    let (a, b) = (id("u"), id("u"));
    let reasons = [
        EndReason::Hangup,
        EndReason::Rejected,
        EndReason::NoAnswer,
        EndReason::Cancelled,
        EndReason::Disconnected,
        EndReason::Failed,
    ];
    let mut recorded = Vec::new();
    for (i, reason) in reasons.into_iter().enumerate() {
        let n = i64::try_from(i).unwrap();
        let call_type = if i % 2 == 0 {
            CallType::Audio
        } else {
            CallType::Video
        };
        let mut call = ringing(&a, &b, call_type, 2_000_000 + n * 1_000);
        if i % 3 == 0 {
            call.conversation_id = Some(format!("conv-{i}"));
        }
        if !reason.is_missed() && reason != EndReason::Rejected {
            call = connected(&call, 2_000_100 + n * 1_000);
        }
        // Timeouts have no `ended_by`.
        let by = (reason != EndReason::NoAnswer).then_some(b.as_str());
        let call = ended(&call, 2_000_900 + n * 1_000, reason, by);
        log.record(&call).await.unwrap();
        recorded.push(call);
    }
    for call in &recorded {
        let got = read(log, &call.id).await;
        assert_eq!(got, as_logged(call), "{:?}", call.end_reason);
    }
    let listed = log.calls_of(&a, None, MAX_PAGE).await.unwrap();
    let expected: Vec<Call> = recorded.iter().rev().map(as_logged).collect();
    assert_eq!(listed, expected, "listed calls carry every field too");
}

pub async fn stages_move_forward(log: &dyn CallLog) {
    let (a, b) = (id("u"), id("u"));
    let call = ringing(&a, &b, CallType::Video, 3_000_000);
    log.record(&call).await.unwrap();
    assert_eq!(read(log, &call.id).await.stage, CallStage::Ringing);
    let call = connected(&call, 3_000_500);
    log.record(&call).await.unwrap();
    assert_eq!(read(log, &call.id).await, as_logged(&call));
    let call = ended(&call, 3_010_500, EndReason::Disconnected, None);
    log.record(&call).await.unwrap();
    let got = read(log, &call.id).await;
    assert_eq!(got, as_logged(&call));
    assert_eq!(got.duration_ms(), Some(10_000));
    // Ringing straight to ended.
    let missed = ringing(&a, &b, CallType::Audio, 3_100_000);
    log.record(&missed).await.unwrap();
    let missed = ended(&missed, 3_130_000, EndReason::NoAnswer, None);
    log.record(&missed).await.unwrap();
    assert_eq!(read(log, &missed.id).await, as_logged(&missed));
    assert_eq!(
        ids(&log.calls_of(&b, None, 10).await.unwrap()),
        vec![missed.id.clone(), call.id.clone()],
        "moving forward updates a call in place"
    );
}

pub async fn never_goes_back(log: &dyn CallLog) {
    let (a, b) = (id("u"), id("u"));

    // Ended, then an older ringing record: still ended.
    let ring = ringing(&a, &b, CallType::Audio, 4_000_000);
    let over = ended(
        &connected(&ring, 4_000_100),
        4_000_900,
        EndReason::Hangup,
        Some(&b),
    );
    log.record(&over).await.unwrap();
    log.record(&ring).await.unwrap();
    assert_eq!(read(log, &over.id).await, as_logged(&over));
    // ... nor an older connected record.
    log.record(&connected(&ring, 4_000_100)).await.unwrap();
    assert_eq!(read(log, &over.id).await, as_logged(&over));

    // Connected, then ringing: still connected.
    let ring = ringing(&a, &b, CallType::Video, 4_100_000);
    let talking = connected(&ring, 4_100_200);
    log.record(&talking).await.unwrap();
    log.record(&ring).await.unwrap();
    let got = read(log, &talking.id).await;
    assert_eq!(got, as_logged(&talking));
    assert_eq!(got.stage, CallStage::Connected);
    assert_eq!(got.answered_at_ms, Some(4_100_200));
    // ... and it still moves forward.
    let over = ended(&talking, 4_100_700, EndReason::Failed, None);
    log.record(&over).await.unwrap();
    log.record(&talking).await.unwrap();
    log.record(&ring).await.unwrap();
    assert_eq!(read(log, &over.id).await, as_logged(&over));

    // Ended without being answered, then the ringing record.
    let ring = ringing(&a, &b, CallType::Audio, 4_200_000);
    let rejected = ended(&ring, 4_200_300, EndReason::Rejected, Some(&b));
    log.record(&rejected).await.unwrap();
    log.record(&ring).await.unwrap();
    assert_eq!(read(log, &ring.id).await, as_logged(&rejected));

    // None of this duplicated a call.
    assert_eq!(log.calls_of(&a, None, MAX_PAGE).await.unwrap().len(), 3);
}

pub async fn same_stage_twice_keeps_the_first(log: &dyn CallLog) {
    let (a, b, c) = (id("u"), id("u"), id("u"));

    let first = ringing(&a, &b, CallType::Audio, 5_000_000);
    log.record(&first).await.unwrap();
    let retry = Call {
        callee_id: c.clone(),
        caller_device: "another-device".into(),
        call_type: CallType::Video,
        conversation_id: Some("conv-x".into()),
        created_at_ms: 5_000_001,
        ..first.clone()
    };
    log.record(&retry).await.unwrap();
    assert_eq!(read(log, &first.id).await, as_logged(&first));

    let answered = connected(&first, 5_000_100);
    log.record(&answered).await.unwrap();
    let other_answer = Call {
        callee_device: "dev-other".into(),
        answered_at_ms: Some(5_000_999),
        ..answered.clone()
    };
    log.record(&other_answer).await.unwrap();
    assert_eq!(read(log, &first.id).await, as_logged(&answered));

    let hung_up = ended(&answered, 5_001_000, EndReason::Hangup, Some(&a));
    log.record(&hung_up).await.unwrap();
    let late = ended(&answered, 5_002_000, EndReason::Disconnected, Some(&b));
    log.record(&late).await.unwrap();
    let got = read(log, &first.id).await;
    assert_eq!(got, as_logged(&hung_up));
    assert_eq!(got.end_reason, Some(EndReason::Hangup));
    assert_eq!(got.ended_by.as_deref(), Some(a.as_str()));
    assert!(
        log.calls_of(&c, None, 10).await.unwrap().is_empty(),
        "the ignored retry's callee is no party"
    );
    let of_b = log.calls_of(&b, None, 10).await.unwrap();
    assert_eq!(of_b, vec![as_logged(&hung_up)]);
}

pub async fn calls_of_lists_both_sides_newest_first(log: &dyn CallLog) {
    let (me, x, y, z) = (id("u"), id("u"), id("u"), id("u"));
    let calls = vec![
        ringing(&me, &x, CallType::Audio, 6_000_000),
        ringing(&y, &me, CallType::Video, 6_000_300),
        ended(
            &ringing(&x, &me, CallType::Audio, 6_000_100),
            6_000_150,
            EndReason::Cancelled,
            Some(&x),
        ),
        connected(&ringing(&me, &z, CallType::Video, 6_000_200), 6_000_250),
    ];
    // Calls `me` is no party of.
    let others = vec![
        ringing(&x, &y, CallType::Audio, 6_000_050),
        ringing(&z, &x, CallType::Audio, 6_000_400),
    ];
    record_all(log, &calls).await;
    record_all(log, &others).await;

    let mine = log.calls_of(&me, None, 10).await.unwrap();
    assert_eq!(ids(&mine), newest_first(&calls));
    assert_eq!(
        mine.iter().map(|c| c.created_at_ms).collect::<Vec<_>>(),
        vec![6_000_300, 6_000_200, 6_000_100, 6_000_000]
    );
    let expected: Vec<Call> = [&calls[1], &calls[3], &calls[2], &calls[0]]
        .into_iter()
        .map(as_logged)
        .collect();
    assert_eq!(mine, expected);

    let of_x = log.calls_of(&x, None, 10).await.unwrap();
    assert_eq!(
        ids(&of_x),
        vec![
            others[1].id.clone(),
            calls[2].id.clone(),
            others[0].id.clone(),
            calls[0].id.clone()
        ],
        "caller or callee"
    );
    assert!(log
        .calls_of(&id("nobody"), None, 10)
        .await
        .unwrap()
        .is_empty());

    // A call to oneself is listed once.
    let myself = ringing(&z, &z, CallType::Audio, 6_000_500);
    log.record(&myself).await.unwrap();
    let of_z = log.calls_of(&z, None, 10).await.unwrap();
    assert_eq!(
        ids(&of_z),
        vec![myself.id.clone(), others[1].id.clone(), calls[3].id.clone()]
    );
}

pub async fn calls_of_breaks_ties_by_id_and_resumes_after_the_cursor(log: &dyn CallLog) {
    let (me, x) = (id("u"), id("u"));
    let t = 7_000_000;
    // Same created_at, me on either side; the tied ids share a prefix so
    // only their suffix decides the order.
    let prefix = id("tie");
    let mk = |call_id: String, caller: &str, callee: &str, at: i64| Call {
        id: call_id,
        ..ringing(caller, callee, CallType::Audio, at)
    };
    let calls = vec![
        mk(format!("{prefix}-b"), &me, &x, t),
        mk(format!("{prefix}-d"), &x, &me, t),
        mk(format!("{prefix}-a"), &x, &me, t),
        mk(format!("{prefix}-c"), &me, &x, t),
        mk(id("older"), &me, &x, t - 1),
        mk(id("newer"), &x, &me, t + 1),
    ];
    record_all(log, &calls).await;

    let all = log.calls_of(&me, None, 10).await.unwrap();
    let expected_ids = vec![
        calls[5].id.clone(),
        format!("{prefix}-d"),
        format!("{prefix}-c"),
        format!("{prefix}-b"),
        format!("{prefix}-a"),
        calls[4].id.clone(),
    ];
    assert_eq!(ids(&all), expected_ids);
    assert_eq!(ids(&all), newest_first(&calls));

    // Strictly older than the cursor: same time with a smaller id, or earlier.
    let cursor = Cursor {
        created_at_ms: t,
        id: format!("{prefix}-c"),
    };
    let after = log.calls_of(&me, Some(&cursor), 10).await.unwrap();
    assert_eq!(ids(&after), expected_ids[3..].to_vec());
    // A cursor naming no stored call still works by position.
    let cursor = Cursor {
        created_at_ms: t,
        id: format!("{prefix}-bb"),
    };
    let after = log.calls_of(&me, Some(&cursor), 2).await.unwrap();
    assert_eq!(ids(&after), expected_ids[3..5].to_vec());
    let cursor = Cursor {
        created_at_ms: t + 1,
        id: String::new(),
    };
    let after = log.calls_of(&me, Some(&cursor), 10).await.unwrap();
    assert_eq!(ids(&after), expected_ids[1..].to_vec());
    // After the oldest: nothing.
    let last = Cursor::after(all.last().unwrap());
    assert!(log.calls_of(&me, Some(&last), 10).await.unwrap().is_empty());
}

pub async fn pages_return_each_call_exactly_once(log: &dyn CallLog) {
    let me = id("u");
    let mut calls = Vec::new();
    for i in 0..23_i64 {
        let peer = id("p");
        // Three calls share each time; sides alternate.
        let at = 8_000_000 + (i / 3) * 10;
        let call = if i % 2 == 0 {
            ringing(&me, &peer, CallType::Audio, at)
        } else {
            ringing(&peer, &me, CallType::Video, at)
        };
        calls.push(call);
    }
    record_all(log, &calls).await;
    // Moving a call forward does not move it in the list.
    let moved = ended(&calls[7], 9_000_000, EndReason::Rejected, Some(&me));
    log.record(&moved).await.unwrap();

    let expected = newest_first(&calls);
    for page_size in [1_u32, 4, 5, 23, 50] {
        let mut seen = Vec::new();
        let mut before: Option<Cursor> = None;
        let mut pages = 0;
        loop {
            let page = log.calls_of(&me, before.as_ref(), page_size).await.unwrap();
            pages += 1;
            assert!(pages <= 30, "paging does not end (page size {page_size})");
            assert!(page.len() <= page_size as usize);
            let Some(last) = page.last() else { break };
            before = Some(Cursor::after(last));
            seen.extend(ids(&page));
        }
        assert_eq!(seen, expected, "page size {page_size}");
        let distinct: HashSet<&String> = seen.iter().collect();
        assert_eq!(distinct.len(), 23);
    }
    let listed = log.calls_of(&me, None, 50).await.unwrap();
    let stage_of_moved = listed.iter().find(|c| c.id == moved.id).map(|c| c.stage);
    assert_eq!(stage_of_moved, Some(CallStage::Ended));
}

pub async fn limit_is_capped_and_zero_is_empty(log: &dyn CallLog) {
    let me = id("u");
    let n = MAX_PAGE as usize + 5;
    let calls: Vec<Call> = (0..n)
        .map(|i| {
            let at = 10_000_000 + i64::try_from(i).unwrap();
            ringing(&me, &id("p"), CallType::Audio, at)
        })
        .collect();
    let writes = calls.iter().map(|c| log.record(c));
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    let expected = newest_first(&calls);
    for limit in [MAX_PAGE + 1, 1_000, u32::MAX] {
        let page = log.calls_of(&me, None, limit).await.unwrap();
        assert_eq!(page.len(), MAX_PAGE as usize, "limit {limit}");
        assert_eq!(ids(&page), expected[..MAX_PAGE as usize].to_vec());
    }
    let page = log.calls_of(&me, None, MAX_PAGE).await.unwrap();
    let rest = log
        .calls_of(&me, Some(&Cursor::after(page.last().unwrap())), u32::MAX)
        .await
        .unwrap();
    assert_eq!(ids(&rest), expected[MAX_PAGE as usize..].to_vec());
    assert!(log.calls_of(&me, None, 0).await.unwrap().is_empty());
    let three = log.calls_of(&me, None, 3).await.unwrap();
    assert_eq!(ids(&three), expected[..3].to_vec());
}
