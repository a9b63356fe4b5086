//! The chat store conformance suite: what every [`ChatStore`] must do. Run
//! against the embedded store and a real MongoDB-wire server. Ids are random
//! so runs can share a database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed step is a failed test"
)]

use std::collections::HashSet;
use std::sync::Arc;

use super::{ChatStore, JoinState, MessageChange, MessageRef, NewMessage, StoreError};

pub async fn run_all(store: Arc<dyn ChatStore>) {
    conversations_upsert_and_read(store.as_ref()).await;
    members_are_removed_and_listed(store.as_ref()).await;
    join_state_is_for_members_only(store.as_ref()).await;
    messages_are_found_by_id_and_seq(store.as_ref()).await;
    edits_only_by_the_sender_and_not_after_delete(store.as_ref()).await;
    delete_is_an_idempotent_tombstone(store.as_ref()).await;
    reactions_are_per_user_and_idempotent(store.as_ref()).await;
    history_pages_backwards(store.as_ref()).await;
    changes_since_replays_what_a_client_missed(store.as_ref()).await;
    read_state_only_moves_forward_and_counts_unread(store.as_ref()).await;
    appends_number_messages_from_one(store.as_ref()).await;
    client_message_id_makes_sends_idempotent(store.as_ref()).await;
    append_to_unknown_conversation_fails(store.as_ref()).await;
    concurrent_appends_get_distinct_gap_free_seqs(store.clone()).await;
    concurrent_retries_store_one_message(store.clone()).await;
    appends_get_seqs_in_call_order(store.clone()).await;
    concurrent_changes_to_one_message_are_all_kept(store.clone()).await;
    store.ping().await.expect("ping");
}

fn id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

pub fn text(conversation_id: &str, sender: &str, content: &str, cmid: Option<&str>) -> NewMessage {
    NewMessage {
        conversation_id: conversation_id.to_owned(),
        sender_id: sender.to_owned(),
        kind: "text".to_owned(),
        content: content.to_owned(),
        client_message_id: cmid.map(str::to_owned),
        reply_to: None,
        metadata: None,
    }
}

pub async fn conversations_upsert_and_read(store: &dyn ChatStore) {
    let c = id("c");
    assert!(store.conversation(&c).await.unwrap().is_none());
    let conv = store
        .upsert_conversation(&c, &["u1".into(), "u2".into()])
        .await
        .unwrap();
    assert_eq!(conv.id, c);
    assert_eq!(conv.last_seq, 0);
    let mut members = conv.member_ids.clone();
    members.sort();
    assert_eq!(members, vec!["u1", "u2"]);
    assert!(conv.has_member("u1") && !conv.has_member("u3"));
    store
        .upsert_conversation(&c, &["u2".into(), "u3".into()])
        .await
        .unwrap();
    let conv = store.conversation(&c).await.unwrap().unwrap();
    let mut members = conv.member_ids;
    members.sort();
    assert_eq!(members, vec!["u2", "u3"], "upsert replaces the member list");
}

pub async fn appends_number_messages_from_one(store: &dyn ChatStore) {
    let c = id("c");
    store
        .upsert_conversation(&c, &["a".into(), "b".into()])
        .await
        .unwrap();
    let mut meta = serde_json::Map::new();
    meta.insert("width".into(), serde_json::json!(640));
    let first = store
        .append_message(NewMessage {
            kind: "image".into(),
            reply_to: Some("m0".into()),
            metadata: Some(meta.clone()),
            ..text(&c, "a", "pic", None)
        })
        .await
        .unwrap();
    assert!(first.created);
    let m = &first.message;
    assert_eq!(
        (
            m.seq,
            m.sender_id.as_str(),
            m.kind.as_str(),
            m.content.as_str()
        ),
        (1, "a", "image", "pic")
    );
    assert_eq!(m.conversation_id, c);
    assert_eq!(m.reply_to.as_deref(), Some("m0"));
    assert_eq!(m.metadata.as_ref(), Some(&meta));
    assert!(m.reactions.is_empty() && m.edited_at.is_none() && m.deleted_at.is_none());
    assert_eq!(m.id.len(), 24);
    let second = store
        .append_message(text(&c, "b", "yo", None))
        .await
        .unwrap();
    assert_eq!(second.message.seq, 2);
    assert_ne!(second.message.id, m.id);
    assert_eq!(store.conversation(&c).await.unwrap().unwrap().last_seq, 2);
    let other = id("c");
    store
        .upsert_conversation(&other, &["a".into()])
        .await
        .unwrap();
    assert_eq!(
        store
            .append_message(text(&other, "a", "x", None))
            .await
            .unwrap()
            .message
            .seq,
        1,
        "seq is per conversation"
    );
}

pub async fn client_message_id_makes_sends_idempotent(store: &dyn ChatStore) {
    let c = id("c");
    store
        .upsert_conversation(&c, &["a".into(), "b".into()])
        .await
        .unwrap();
    let original = store
        .append_message(text(&c, "a", "hello", Some("k1")))
        .await
        .unwrap();
    assert!(original.created);
    assert_eq!(original.message.client_message_id.as_deref(), Some("k1"));
    let retry = store
        .append_message(text(&c, "a", "hello", Some("k1")))
        .await
        .unwrap();
    assert!(!retry.created, "a retry stores nothing new");
    assert_eq!(
        retry.message, original.message,
        "a retry returns the original message"
    );
    let other_sender = store
        .append_message(text(&c, "b", "hi", Some("k1")))
        .await
        .unwrap();
    assert!(other_sender.created, "client ids are per sender");
    assert_eq!(other_sender.message.seq, 2);
    assert_eq!(store.conversation(&c).await.unwrap().unwrap().last_seq, 2);
}

pub async fn append_to_unknown_conversation_fails(store: &dyn ChatStore) {
    let err = store
        .append_message(text(&id("nope"), "a", "x", None))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ConversationNotFound), "{err:?}");
}

pub async fn concurrent_appends_get_distinct_gap_free_seqs(store: Arc<dyn ChatStore>) {
    let c = id("c");
    store.upsert_conversation(&c, &["a".into()]).await.unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let (store, c) = (store.clone(), c.clone());
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..8 {
                    let m = store
                        .append_message(text(&c, "a", &format!("{t}-{i}"), None))
                        .await
                        .unwrap();
                    seqs.push(m.message.seq);
                }
                seqs
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one sender's seqs increase: {seqs:?}"
        );
        all.extend(seqs);
    }
    let distinct: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), 32, "no duplicate seq");
    assert_eq!(distinct, (1..=32).collect(), "no gap");
}

/// Appends started in one order are numbered in that order, however their
/// futures are then polled (the chat service publishes them in call order).
pub async fn appends_get_seqs_in_call_order(store: Arc<dyn ChatStore>) {
    let c = id("c");
    store.upsert_conversation(&c, &["a".into()]).await.unwrap();
    let started: Vec<_> = (0..24)
        .map(|i| store.append_message(text(&c, "a", &format!("m{i}"), None)))
        .collect();
    // Polled last to first, each on a task of its own.
    let tasks: Vec<_> = started.into_iter().rev().map(tokio::spawn).collect();
    let mut seqs: Vec<(u64, String)> = Vec::new();
    for task in tasks {
        let appended = task.await.unwrap().unwrap();
        seqs.push((appended.message.seq, appended.message.content));
    }
    seqs.sort();
    let contents: Vec<String> = seqs.into_iter().map(|(_, content)| content).collect();
    let expected: Vec<String> = (0..24).map(|i| format!("m{i}")).collect();
    assert_eq!(contents, expected, "seq follows the order of the calls");
}

async fn conversation_with(
    store: &dyn ChatStore,
    members: &[&str],
    messages: usize,
) -> (String, Vec<String>) {
    let c = id("c");
    let members: Vec<String> = members.iter().map(|m| (*m).to_owned()).collect();
    store.upsert_conversation(&c, &members).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..messages {
        let sender = &members[i % members.len()];
        ids.push(
            store
                .append_message(text(&c, sender, &format!("m{}", i + 1), None))
                .await
                .unwrap()
                .message
                .id,
        );
    }
    (c, ids)
}

pub async fn members_are_removed_and_listed(store: &dyn ChatStore) {
    let user = id("u");
    let (c1, _) = conversation_with(store, &[&user, "x"], 0).await;
    let (c2, _) = conversation_with(store, &["y", &user], 1).await;
    let mut mine: Vec<(String, u64, u64)> = store
        .conversations_of(&user)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.id, c.last_seq, c.members))
        .collect();
    mine.sort();
    let mut expected = vec![(c1.clone(), 0, 2), (c2.clone(), 1, 2)];
    expected.sort();
    assert_eq!(mine, expected);
    let conv = store.remove_member(&c1, &user).await.unwrap();
    assert_eq!(conv.member_ids, vec!["x"]);
    assert_eq!(
        store.remove_member(&c1, &user).await.unwrap().member_ids,
        vec!["x"],
        "removing twice is harmless"
    );
    assert_eq!(store.conversations_of(&user).await.unwrap().len(), 1);
    let theirs = store.conversations_of("x").await.unwrap();
    let c1_of_x = theirs
        .iter()
        .find(|c| c.id == c1)
        .expect("x is still in c1");
    assert_eq!(c1_of_x.members, 1, "the count follows removals");
    assert_eq!(
        store.remove_member(&id("nope"), &user).await.unwrap_err(),
        StoreError::ConversationNotFound
    );
}

pub async fn join_state_is_for_members_only(store: &dyn ChatStore) {
    let (c, _) = conversation_with(store, &["a", "b"], 3).await;
    assert_eq!(
        store.join_state(&c, "a").await.unwrap(),
        Some(JoinState {
            last_seq: 3,
            read_up_to: 0
        })
    );
    store.mark_read(&c, "a", 2).await.unwrap();
    assert_eq!(
        store.join_state(&c, "a").await.unwrap(),
        Some(JoinState {
            last_seq: 3,
            read_up_to: 2
        })
    );
    assert_eq!(store.join_state(&c, "stranger").await.unwrap(), None);
    assert_eq!(store.join_state(&id("nope"), "a").await.unwrap(), None);
    store
        .upsert_conversation(&c, &["b".to_owned(), "new".to_owned()])
        .await
        .unwrap();
    assert_eq!(store.join_state(&c, "a").await.unwrap(), None, "removed");
    assert_eq!(
        store
            .join_state(&c, "new")
            .await
            .unwrap()
            .map(|s| s.last_seq),
        Some(3),
        "added"
    );
}

pub async fn messages_are_found_by_id_and_seq(store: &dyn ChatStore) {
    let (c, ids) = conversation_with(store, &["a"], 2).await;
    let by_id = store
        .message(&c, &MessageRef::Id(ids[1].clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((by_id.seq, by_id.content.as_str()), (2, "m2"));
    let by_seq = store
        .message(&c, &MessageRef::Seq(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_seq.id, ids[0]);
    assert!(store
        .message(&c, &MessageRef::Seq(3))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .message(&c, &MessageRef::Id("not-an-id".into()))
        .await
        .unwrap()
        .is_none());
    let (other, _) = conversation_with(store, &["a"], 0).await;
    assert!(
        store
            .message(&other, &MessageRef::Id(ids[0].clone()))
            .await
            .unwrap()
            .is_none(),
        "ids are per conversation"
    );
}

pub async fn edits_only_by_the_sender_and_not_after_delete(store: &dyn ChatStore) {
    let (c, ids) = conversation_with(store, &["a", "b"], 1).await;
    let edit = |by: &str, content: &str| MessageChange::Edit {
        by: by.into(),
        content: content.into(),
    };
    assert_eq!(
        store
            .update_message(&c, &ids[0], &edit("b", "hack"))
            .await
            .unwrap_err(),
        StoreError::NotSender
    );
    let before = store
        .message(&c, &MessageRef::Id(ids[0].clone()))
        .await
        .unwrap()
        .unwrap();
    let edited = store
        .update_message(&c, &ids[0], &edit("a", "fixed"))
        .await
        .unwrap();
    assert!(edited.changed);
    assert_eq!(edited.message.content, "fixed");
    assert!(edited.message.edited_at.is_some());
    assert!(edited.message.version > before.version);
    assert_eq!(
        (edited.message.id.as_str(), edited.message.seq),
        (ids[0].as_str(), 1)
    );
    let stored = store
        .message(&c, &MessageRef::Id(ids[0].clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, edited.message, "the edit is stored");
    store
        .update_message(&c, &ids[0], &MessageChange::Delete { by: "a".into() })
        .await
        .unwrap();
    assert_eq!(
        store
            .update_message(&c, &ids[0], &edit("a", "again"))
            .await
            .unwrap_err(),
        StoreError::MessageDeleted
    );
    let unknown = super::new_message_id();
    assert_eq!(
        store
            .update_message(&c, &unknown, &edit("a", "x"))
            .await
            .unwrap_err(),
        StoreError::MessageNotFound
    );
    assert_eq!(
        store
            .update_message(&c, "bogus", &edit("a", "x"))
            .await
            .unwrap_err(),
        StoreError::MessageNotFound
    );
    assert_eq!(
        store.conversation(&c).await.unwrap().unwrap().last_seq,
        1,
        "changes take no seq"
    );
}

pub async fn delete_is_an_idempotent_tombstone(store: &dyn ChatStore) {
    let (c, _) = conversation_with(store, &["a", "b"], 0).await;
    let mut meta = serde_json::Map::new();
    meta.insert("url".into(), serde_json::json!("https://files/x"));
    let m = store
        .append_message(NewMessage {
            kind: "file".into(),
            metadata: Some(meta),
            ..text(&c, "a", "x.pdf", None)
        })
        .await
        .unwrap()
        .message;
    let delete = |by: &str| MessageChange::Delete { by: by.into() };
    assert_eq!(
        store
            .update_message(&c, &m.id, &delete("b"))
            .await
            .unwrap_err(),
        StoreError::NotSender
    );
    let deleted = store.update_message(&c, &m.id, &delete("a")).await.unwrap();
    assert!(deleted.changed);
    let t = &deleted.message;
    assert_eq!(
        (t.id.as_str(), t.seq, t.content.as_str()),
        (m.id.as_str(), m.seq, "")
    );
    assert!(t.metadata.is_none() && t.deleted_at.is_some());
    let again = store.update_message(&c, &m.id, &delete("a")).await.unwrap();
    assert!(!again.changed);
    assert_eq!(again.message.deleted_at, t.deleted_at);
}

pub async fn reactions_are_per_user_and_idempotent(store: &dyn ChatStore) {
    let (c, ids) = conversation_with(store, &["a", "b"], 1).await;
    let add = |by: &str, e: &str| MessageChange::AddReaction {
        by: by.into(),
        emoji: e.into(),
    };
    let remove = |by: &str, e: &str| MessageChange::RemoveReaction {
        by: by.into(),
        emoji: e.into(),
    };
    assert!(
        store
            .update_message(&c, &ids[0], &add("a", "👍"))
            .await
            .unwrap()
            .changed
    );
    let r = store
        .update_message(&c, &ids[0], &add("b", "👍"))
        .await
        .unwrap();
    assert_eq!(
        r.message.reactions.get("👍").unwrap(),
        &vec!["a".to_owned(), "b".to_owned()]
    );
    let repeat = store
        .update_message(&c, &ids[0], &add("a", "👍"))
        .await
        .unwrap();
    assert!(!repeat.changed, "adding twice changes nothing");
    assert_eq!(repeat.message.reactions.get("👍").unwrap().len(), 2);
    store
        .update_message(&c, &ids[0], &add("a", "🎉"))
        .await
        .unwrap();
    let r = store
        .update_message(&c, &ids[0], &remove("a", "👍"))
        .await
        .unwrap();
    assert!(r.changed);
    assert_eq!(
        r.message.reactions.get("👍").unwrap(),
        &vec!["b".to_owned()]
    );
    let r = store
        .update_message(&c, &ids[0], &remove("a", "🎉"))
        .await
        .unwrap();
    assert!(
        !r.message.reactions.contains_key("🎉"),
        "an emoji nobody uses disappears"
    );
    assert!(
        !store
            .update_message(&c, &ids[0], &remove("a", "🎉"))
            .await
            .unwrap()
            .changed
    );
    let stored = store
        .message(&c, &MessageRef::Seq(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.reactions, r.message.reactions);
    store
        .update_message(&c, &ids[0], &MessageChange::Delete { by: "a".into() })
        .await
        .unwrap();
    assert_eq!(
        store
            .update_message(&c, &ids[0], &add("b", "👍"))
            .await
            .unwrap_err(),
        StoreError::MessageDeleted
    );
}

pub async fn history_pages_backwards(store: &dyn ChatStore) {
    let (c, _) = conversation_with(store, &["a"], 5).await;
    let seqs = |p: &super::Page| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let latest = store.history(&c, None, 2).await.unwrap();
    assert_eq!((seqs(&latest), latest.has_more), (vec![4, 5], true));
    let older = store.history(&c, Some(4), 2).await.unwrap();
    assert_eq!((seqs(&older), older.has_more), (vec![2, 3], true));
    let oldest = store.history(&c, Some(2), 2).await.unwrap();
    assert_eq!((seqs(&oldest), oldest.has_more), (vec![1], false));
    let all = store.history(&c, None, 100).await.unwrap();
    assert_eq!((seqs(&all), all.has_more), (vec![1, 2, 3, 4, 5], false));
}

pub async fn changes_since_replays_what_a_client_missed(store: &dyn ChatStore) {
    let (c, ids) = conversation_with(store, &["a"], 3).await;
    // A client saw 1..=3, then went offline while these happened:
    store
        .update_message(
            &c,
            &ids[1],
            &MessageChange::Edit {
                by: "a".into(),
                content: "m2'".into(),
            },
        )
        .await
        .unwrap();
    store
        .update_message(
            &c,
            &ids[0],
            &MessageChange::AddReaction {
                by: "a".into(),
                emoji: "👍".into(),
            },
        )
        .await
        .unwrap();
    store
        .append_message(text(&c, "a", "m4", None))
        .await
        .unwrap();
    store
        .append_message(text(&c, "a", "m5", None))
        .await
        .unwrap();
    let replay = store.changes_since(&c, 3, 10).await.unwrap();
    let seqs = |v: &[super::Message]| v.iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(seqs(&replay.changed), vec![1, 2]);
    assert_eq!(replay.changed[1].content, "m2'");
    assert_eq!(seqs(&replay.new), vec![4, 5]);
    assert!(replay.complete);
    let bounded = store.changes_since(&c, 3, 1).await.unwrap();
    assert_eq!(seqs(&bounded.new), vec![5], "the newest within the bound");
    assert!(!bounded.complete);
    let fresh = store.changes_since(&c, 0, 10).await.unwrap();
    assert!(fresh.changed.is_empty());
    assert_eq!(seqs(&fresh.new), vec![1, 2, 3, 4, 5]);
    let ahead = store.changes_since(&c, 99, 10).await.unwrap();
    assert!(
        ahead.changed.is_empty() && ahead.new.is_empty(),
        "a lastSeq naming no message replays no edits"
    );
    let current = store.changes_since(&c, 5, 10).await.unwrap();
    assert!(current.new.is_empty() && current.changed.is_empty() && current.complete);
}

pub async fn read_state_only_moves_forward_and_counts_unread(store: &dyn ChatStore) {
    let (c, ids) = conversation_with(store, &["a", "b"], 4).await; // a: 1,3  b: 2,4
    assert_eq!(store.read_up_to(&c, "a").await.unwrap(), 0);
    assert_eq!(store.unread_count(&c, "a").await.unwrap(), 2);
    let r = store.mark_read(&c, "a", 2).await.unwrap();
    assert_eq!((r.read_up_to, r.advanced), (2, true));
    let r = store.mark_read(&c, "a", 1).await.unwrap();
    assert_eq!((r.read_up_to, r.advanced), (2, false), "never backwards");
    let r = store.mark_read(&c, "a", 2).await.unwrap();
    assert!(!r.advanced, "same position is no change");
    assert_eq!(store.unread_count(&c, "a").await.unwrap(), 1);
    store
        .update_message(&c, &ids[3], &MessageChange::Delete { by: "b".into() })
        .await
        .unwrap();
    assert_eq!(
        store.unread_count(&c, "a").await.unwrap(),
        0,
        "deleted messages are not unread"
    );
    assert_eq!(store.read_up_to(&c, "b").await.unwrap(), 0);
    assert_eq!(store.unread_count(&c, "b").await.unwrap(), 2);
}

pub async fn concurrent_retries_store_one_message(store: Arc<dyn ChatStore>) {
    let c = id("c");
    store.upsert_conversation(&c, &["a".into()]).await.unwrap();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (store, c) = (store.clone(), c.clone());
            tokio::spawn(async move {
                store
                    .append_message(text(&c, "a", "once", Some("retry-1")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut created = 0;
    let mut ids = HashSet::new();
    for t in tasks {
        let appended = t.await.unwrap();
        created += usize::from(appended.created);
        ids.insert(appended.message.id);
    }
    assert_eq!(created, 1, "one retry stores, the others get the original");
    assert_eq!(ids.len(), 1);
    assert_eq!(
        store.conversation(&c).await.unwrap().unwrap().last_seq,
        1,
        "no seq spent on a retry"
    );
    let next = store
        .append_message(text(&c, "a", "next", None))
        .await
        .unwrap();
    assert_eq!(next.message.seq, 2, "no gap after a lost race");
}

/// Reactions from many users to one message at once: none is lost, and each
/// change takes a version of its own, above the message's.
pub async fn concurrent_changes_to_one_message_are_all_kept(store: Arc<dyn ChatStore>) {
    let users: Vec<String> = (0..12).map(|u| format!("u{u:02}")).collect();
    let (c, ids) = {
        let members: Vec<&str> = users.iter().map(String::as_str).collect();
        conversation_with(store.as_ref(), &members, 1).await
    };
    let before = store
        .message(&c, &MessageRef::Id(ids[0].clone()))
        .await
        .unwrap()
        .unwrap();
    let tasks: Vec<_> = users
        .iter()
        .map(|u| {
            let (store, c, id, u) = (store.clone(), c.clone(), ids[0].clone(), u.clone());
            tokio::spawn(async move {
                let change = MessageChange::AddReaction {
                    by: u,
                    emoji: "👍".into(),
                };
                store.update_message(&c, &id, &change).await.unwrap()
            })
        })
        .collect();
    let mut versions = HashSet::new();
    for t in tasks {
        let updated = t.await.unwrap();
        assert!(updated.changed);
        assert!(updated.message.version > before.version);
        versions.insert(updated.message.version);
    }
    assert_eq!(versions.len(), users.len(), "one version per change");
    let stored = store
        .message(&c, &MessageRef::Id(ids[0].clone()))
        .await
        .unwrap()
        .unwrap();
    let mut reacted = stored.reactions["👍"].clone();
    reacted.sort();
    assert_eq!(reacted, users, "no reaction lost");
    let replay = store.changes_since(&c, 1, 10).await.unwrap();
    assert_eq!(
        replay.changed.len(),
        1,
        "a client that saw it gets the change"
    );
    assert_eq!(replay.changed[0].reactions, stored.reactions);
}
