//! Store latency for operators: every [`ChatStore`] call the service makes
//! goes through [`Timed`], which records its duration in
//! `quckchat_store_seconds{store="chat",backend,op}` and a store failure
//! (`Unavailable`, not answers such as "message not found") in
//! `quckchat_store_errors_total{store="chat",backend,op}`. Labels are static
//! strings: recording allocates nothing. README.md#metrics lists them.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use futures::future::BoxFuture;

use super::{
    Appended, ChatStore, Conversation, ConversationSummary, JoinState, MembershipChange, Message,
    MessageChange, MessageRef, NewMessage, Page, ReadState, Replay, StoreError, Updated,
};

/// A [`ChatStore`] that times the one it wraps.
pub struct Timed {
    inner: Arc<dyn ChatStore>,
    backend: &'static str,
}

impl Timed {
    /// Wraps `store` ([`crate::service::ChatService::new`] does, once).
    pub fn wrap(store: Arc<dyn ChatStore>) -> Arc<dyn ChatStore> {
        let backend = store.kind();
        Arc::new(Self {
            inner: store,
            backend,
        })
    }
}

/// Records one call of `op` that started at `started`.
fn observe<T>(
    backend: &'static str,
    op: &'static str,
    started: Instant,
    result: &Result<T, StoreError>,
) {
    metrics::histogram!(
        "quckchat_store_seconds",
        "store" => "chat",
        "backend" => backend,
        "op" => op,
    )
    .record(started.elapsed().as_secs_f64());
    if let Err(StoreError::Unavailable(_)) = result {
        metrics::counter!(
            "quckchat_store_errors_total",
            "store" => "chat",
            "backend" => backend,
            "op" => op,
        )
        .increment(1);
    }
}

/// Times `call` as `op`.
macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let span = tracing::info_span!(
            target: quckchat_runtime::telemetry::TRACE,
            "store",
            otel.name = concat!("store.", $op),
            db.system = $self.backend,
        );
        let result = tracing::Instrument::instrument($call, span).await;
        observe($self.backend, $op, started, &result);
        result
    }};
}

#[async_trait]
impl ChatStore for Timed {
    async fn upsert_conversation(
        &self,
        id: &str,
        member_ids: &[String],
    ) -> Result<Conversation, StoreError> {
        timed!(
            self,
            "upsert_conversation",
            self.inner.upsert_conversation(id, member_ids)
        )
    }

    async fn remove_member(&self, id: &str, user_id: &str) -> Result<Conversation, StoreError> {
        timed!(self, "remove_member", self.inner.remove_member(id, user_id))
    }

    async fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        timed!(self, "conversation", self.inner.conversation(id))
    }

    async fn conversations_of(
        &self,
        user_id: &str,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        timed!(
            self,
            "conversations_of",
            self.inner.conversations_of(user_id)
        )
    }

    async fn join_state(
        &self,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<Option<JoinState>, StoreError> {
        timed!(
            self,
            "join_state",
            self.inner.join_state(conversation_id, user_id)
        )
    }

    fn append_message(&self, new: NewMessage) -> BoxFuture<'static, Result<Appended, StoreError>> {
        // The call starts the append (its seq turn): time from here.
        let started = Instant::now();
        let backend = self.backend;
        let span = tracing::info_span!(
            target: quckchat_runtime::telemetry::TRACE,
            "store",
            otel.name = "store.append_message",
            db.system = backend,
        );
        let append = span.in_scope(|| self.inner.append_message(new));
        Box::pin(tracing::Instrument::instrument(
            async move {
                let result = append.await;
                observe(backend, "append_message", started, &result);
                result
            },
            span,
        ))
    }

    async fn message(
        &self,
        conversation_id: &str,
        which: &MessageRef,
    ) -> Result<Option<Message>, StoreError> {
        timed!(self, "message", self.inner.message(conversation_id, which))
    }

    async fn update_message(
        &self,
        conversation_id: &str,
        message_id: &str,
        change: &MessageChange,
    ) -> Result<Updated, StoreError> {
        timed!(
            self,
            "update_message",
            self.inner
                .update_message(conversation_id, message_id, change)
        )
    }

    async fn history(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        timed!(
            self,
            "history",
            self.inner.history(conversation_id, before_seq, limit)
        )
    }

    async fn changes_since(
        &self,
        conversation_id: &str,
        last_seq: u64,
        max: usize,
    ) -> Result<Replay, StoreError> {
        timed!(
            self,
            "changes_since",
            self.inner.changes_since(conversation_id, last_seq, max)
        )
    }

    async fn mark_read(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
    ) -> Result<ReadState, StoreError> {
        timed!(
            self,
            "mark_read",
            self.inner.mark_read(conversation_id, user_id, seq)
        )
    }

    async fn read_up_to(&self, conversation_id: &str, user_id: &str) -> Result<u64, StoreError> {
        timed!(
            self,
            "read_up_to",
            self.inner.read_up_to(conversation_id, user_id)
        )
    }

    async fn unread_count(&self, conversation_id: &str, user_id: &str) -> Result<u64, StoreError> {
        timed!(
            self,
            "unread_count",
            self.inner.unread_count(conversation_id, user_id)
        )
    }

    // Not timed: a long-lived watch, and the readiness probe.
    async fn membership_changes(
        &self,
    ) -> Result<Option<futures::stream::BoxStream<'static, MembershipChange>>, StoreError> {
        self.inner.membership_changes().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}
