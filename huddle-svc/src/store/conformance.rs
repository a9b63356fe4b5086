//! The huddle store conformance suite: what every [`HuddleStore`] must do.
//! Run against the embedded store and a real MongoDB-wire server. Huddle
//! and conversation ids are random, so runs can share a database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed step is a failed test"
)]

use std::sync::Arc;

use super::{HuddleStore, MAX_LISTED};
use crate::huddle::Huddle;

/// A time with milliseconds in it (they must survive the round trip).
const T0: i64 = 1_700_000_000_123;

pub async fn run_all(store: Arc<dyn HuddleStore>) {
    let s = store.as_ref();
    unknown_huddle_is_none(s).await;
    every_field_round_trips(s).await;
    create_twice_keeps_the_first(s).await;
    lists_open_huddles_of_the_conversation_oldest_first(s).await;
    limit_is_honoured_and_capped(s).await;
    end_happens_once(s).await;
    end_of_unknown_is_none(s).await;
    concurrent_ends_have_one_winner(store.clone()).await;
    store.ping().await.expect("ping");
}

fn id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

async fn unknown_huddle_is_none(store: &dyn HuddleStore) {
    assert_eq!(store.get(&id("nohuddle")).await.unwrap(), None);
}

async fn every_field_round_trips(store: &dyn HuddleStore) {
    let conv = id("conv");
    let titled = Huddle::new(&conv, Some("Daily standup ☕".into()), "alice", T0);
    let untitled = Huddle::new(&conv, None, "bob", T0 + 1);
    for h in [&titled, &untitled] {
        store.create(h).await.unwrap();
        assert_eq!(store.get(&h.id).await.unwrap().as_ref(), Some(h));
    }
}

async fn create_twice_keeps_the_first(store: &dyn HuddleStore) {
    let first = Huddle::new(&id("conv"), Some("first".into()), "alice", T0);
    store.create(&first).await.unwrap();
    let second = Huddle {
        conversation_id: id("conv"),
        title: None,
        created_by: "mallory".into(),
        created_at_ms: T0 + 5_000,
        ..first.clone()
    };
    store.create(&second).await.unwrap();
    assert_eq!(store.get(&first.id).await.unwrap(), Some(first.clone()));
    assert_eq!(
        store
            .by_conversation(&first.conversation_id, 10)
            .await
            .unwrap(),
        vec![first]
    );
    assert!(store
        .by_conversation(&second.conversation_id, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn lists_open_huddles_of_the_conversation_oldest_first(store: &dyn HuddleStore) {
    let conv = id("conv");
    let other = id("conv");
    assert!(store.by_conversation(&conv, 10).await.unwrap().is_empty());
    // Created out of order: the list is by creation time, not insertion.
    let newest = Huddle::new(&conv, Some("c".into()), "alice", T0 + 3_000);
    let oldest = Huddle::new(&conv, None, "bob", T0 + 1_000);
    let middle = Huddle::new(&conv, Some("b".into()), "carol", T0 + 2_000);
    let ended = Huddle::new(&conv, None, "dave", T0 + 1_500);
    let elsewhere = Huddle::new(&other, None, "erin", T0 + 1_200);
    for h in [&newest, &oldest, &middle, &ended, &elsewhere] {
        store.create(h).await.unwrap();
    }
    assert!(store.end(&ended.id, T0 + 4_000).await.unwrap().is_some());
    assert_eq!(
        store.by_conversation(&conv, 10).await.unwrap(),
        vec![oldest, middle, newest]
    );
    assert_eq!(
        store.by_conversation(&other, 10).await.unwrap(),
        vec![elsewhere]
    );
}

async fn limit_is_honoured_and_capped(store: &dyn HuddleStore) {
    let conv = id("conv");
    let step = i64::from(MAX_LISTED) + 1;
    let all: Vec<Huddle> = (0..step)
        .map(|i| Huddle::new(&conv, None, "alice", T0 + i * 10))
        .collect();
    // Concurrently: a round trip each to a server adds up.
    futures::future::try_join_all(all.iter().map(|h| store.create(h)))
        .await
        .unwrap();
    assert_eq!(store.by_conversation(&conv, 0).await.unwrap(), vec![]);
    assert_eq!(
        store.by_conversation(&conv, 3).await.unwrap(),
        all[..3].to_vec()
    );
    let max = MAX_LISTED as usize;
    assert_eq!(
        store.by_conversation(&conv, MAX_LISTED).await.unwrap(),
        all[..max].to_vec()
    );
    for limit in [MAX_LISTED + 1, MAX_LISTED * 10, u32::MAX] {
        let listed = store.by_conversation(&conv, limit).await.unwrap();
        assert_eq!(listed.len(), max, "limit {limit}");
        assert_eq!(listed, all[..max].to_vec(), "limit {limit}");
    }
}

async fn end_happens_once(store: &dyn HuddleStore) {
    let conv = id("conv");
    let h = Huddle::new(&conv, Some("retro".into()), "alice", T0);
    store.create(&h).await.unwrap();
    let ended = Huddle {
        ended_at_ms: Some(T0 + 60_007),
        ..h.clone()
    };
    assert_eq!(
        store.end(&h.id, T0 + 60_007).await.unwrap(),
        Some(ended.clone())
    );
    // Once only: a later end neither answers nor moves the time.
    assert_eq!(store.end(&h.id, T0 + 90_000).await.unwrap(), None);
    assert_eq!(store.get(&h.id).await.unwrap(), Some(ended));
    assert!(store.by_conversation(&conv, 10).await.unwrap().is_empty());
}

async fn end_of_unknown_is_none(store: &dyn HuddleStore) {
    assert_eq!(store.end(&id("nohuddle"), T0).await.unwrap(), None);
}

async fn concurrent_ends_have_one_winner(store: Arc<dyn HuddleStore>) {
    let h = Huddle::new(&id("conv"), None, "alice", T0);
    store.create(&h).await.unwrap();
    let tasks: Vec<_> = (0..8_i64)
        .map(|i| {
            let (store, id) = (store.clone(), h.id.clone());
            tokio::spawn(async move { store.end(&id, T0 + 1_000 + i).await })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        if let Some(ended) = task.await.unwrap().unwrap() {
            winners.push(ended);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let winner = winners.remove(0);
    let at = winner.ended_at_ms.unwrap();
    assert!((T0 + 1_000..T0 + 1_008).contains(&at), "{at}");
    assert_eq!(
        winner,
        Huddle {
            ended_at_ms: Some(at),
            ..h.clone()
        }
    );
    assert_eq!(store.get(&h.id).await.unwrap(), Some(winner));
}
