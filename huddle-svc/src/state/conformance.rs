//! The live huddle state conformance suite, run against
//! [`super::MemoryRoomState`] and a real Redis. Huddle ids are random per
//! case so runs can share a Redis prefix.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed step is a failed test"
)]

use std::sync::Arc;

use super::RoomState;
use crate::huddle::{Participant, Room};

pub async fn run_all(state: Arc<dyn RoomState>) {
    an_unknown_huddle_has_an_empty_room(state.as_ref()).await;
    commits_round_trip_and_check_the_rev(state.as_ref()).await;
    racing_commits_have_one_winner(state.clone()).await;
    due_and_live_follow_the_room(state.as_ref()).await;
    removed_rooms_are_gone(state.as_ref()).await;
    state.ping().await.unwrap();
}

fn id() -> String {
    format!("h{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

fn participant(user: &str, away_until_ms: Option<i64>) -> Participant {
    Participant {
        user_id: user.into(),
        device_id: "phone".into(),
        conn_id: format!("k-{user}"),
        node_id: "gw1".into(),
        audio: true,
        video: false,
        screen: false,
        hand_raised: true,
        joined_at_ms: 1_700_000_000_123,
        away_until_ms,
    }
}

fn next(room: &Room, participants: Vec<Participant>) -> Room {
    Room {
        rev: room.rev + 1,
        version: room.version + 1,
        participants,
    }
}

pub async fn an_unknown_huddle_has_an_empty_room(s: &dyn RoomState) {
    assert_eq!(s.load(&id()).await.unwrap(), Room::default());
}

pub async fn commits_round_trip_and_check_the_rev(s: &dyn RoomState) {
    let h = id();
    let first = next(&Room::default(), vec![participant("alice", None)]);
    assert!(s.commit(&h, &first).await.unwrap());
    assert_eq!(s.load(&h).await.unwrap(), first);
    assert!(
        !s.commit(&h, &first).await.unwrap(),
        "the same rev again loses"
    );
    let stale = next(&Room::default(), vec![]);
    assert!(
        !s.commit(&h, &stale).await.unwrap(),
        "a commit from rev 0 loses"
    );
    let second = next(
        &first,
        vec![participant("alice", None), participant("bob", None)],
    );
    assert!(s.commit(&h, &second).await.unwrap());
    assert_eq!(s.load(&h).await.unwrap(), second);
}

pub async fn racing_commits_have_one_winner(s: Arc<dyn RoomState>) {
    let h = id();
    let base = s.load(&h).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (s, h, room) = (
                s.clone(),
                h.clone(),
                next(&base, vec![participant(&format!("u{i}"), None)]),
            );
            tokio::spawn(async move { s.commit(&h, &room).await.unwrap() })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
}

pub async fn due_and_live_follow_the_room(s: &dyn RoomState) {
    let (h, quiet) = (id(), id());
    let room = next(
        &Room::default(),
        vec![participant("alice", Some(5_000)), participant("bob", None)],
    );
    assert!(s.commit(&h, &room).await.unwrap());
    let empty = next(&Room::default(), vec![]);
    assert!(s.commit(&quiet, &empty).await.unwrap());
    assert!(!s.due(4_999).await.unwrap().contains(&h));
    assert!(s.due(5_000).await.unwrap().contains(&h));
    let live = s.live().await.unwrap();
    assert!(live.contains(&h));
    assert!(
        !live.contains(&quiet),
        "a room without participants is not live"
    );
    let back = next(&room, vec![participant("bob", None)]);
    assert!(s.commit(&h, &back).await.unwrap());
    assert!(
        !s.due(10_000).await.unwrap().contains(&h),
        "no departure left"
    );
    let gone = next(&back, vec![]);
    assert!(s.commit(&h, &gone).await.unwrap());
    assert!(!s.live().await.unwrap().contains(&h));
    assert_eq!(
        s.load(&h).await.unwrap().version,
        3,
        "the version outlives participants"
    );
}

pub async fn removed_rooms_are_gone(s: &dyn RoomState) {
    let h = id();
    let room = next(&Room::default(), vec![participant("alice", Some(1))]);
    assert!(s.commit(&h, &room).await.unwrap());
    s.remove(&h).await.unwrap();
    assert_eq!(s.load(&h).await.unwrap(), Room::default());
    assert!(!s.due(10).await.unwrap().contains(&h));
    assert!(!s.live().await.unwrap().contains(&h));
}
