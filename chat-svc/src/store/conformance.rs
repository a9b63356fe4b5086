//! The chat store conformance suite: what every [`ChatStore`] must do. Run
//! against the embedded store and a real MongoDB-wire server. Ids are random
//! so runs can share a database.

use std::collections::HashSet;
use std::sync::Arc;

use super::{ChatStore, NewMessage, StoreError};

pub async fn run_all(store: Arc<dyn ChatStore>) {
    conversations_upsert_and_read(store.as_ref()).await;
    appends_number_messages_from_one(store.as_ref()).await;
    client_message_id_makes_sends_idempotent(store.as_ref()).await;
    append_to_unknown_conversation_fails(store.as_ref()).await;
    concurrent_appends_get_distinct_gap_free_seqs(store.clone()).await;
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
