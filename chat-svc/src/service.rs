//! The chat service's logic: joins and client pushes on `chat:<id>` topics
//! (docs/protocol.md#chat-join, #chat-events) and the operations internal callers use over gRPC,
//! independent of how either arrives.
//!
//! Every command is authorised: the sender must be a member of the
//! conversation right now. Membership is cached per replica and invalidated
//! on every replica when it changes through this service, or when the
//! backend changes MongoDB directly (change stream); at worst it is
//! [`MEMBERSHIP_TTL`] old.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prost::Message as _;
use quckchat_proto::bus::MessagePush;
use quckchat_runtime::bus::{Bus, Subjects};
use quckchat_runtime::errors::ClientError;
use quckchat_runtime::ids::valid_id;
use quckchat_runtime::presence::MAX_PRESENCE_MEMBERS;
use quckchat_runtime::publish::Publisher;
use quckchat_runtime::push;
use quckchat_runtime::routes;
use quckchat_runtime::service::{Command, Payload, Reply, Response, Service};
use serde_json::{json, Value};

use crate::payload::{content_field, emoji_field};
pub use crate::payload::{
    parse_send, MAX_CLIENT_MESSAGE_ID, MAX_CONTENT_CHARS, MAX_METADATA_BYTES,
};
use crate::presence::{PresenceLookup, PRESENCE_TIMEOUT};
use crate::store::{
    ChatStore, Conversation, Message, MessageChange, MessageRef, NewMessage, Page, StoreError,
};
use crate::turns::Turns;
use crate::typing::Typing;
pub use crate::typing::{TYPING_EXPIRY, TYPING_THROTTLE};
/// Most messages (new, and changed old ones) replayed after a join with
/// `lastSeq`; past it the join reply says `replayComplete: false` and the
/// client pages the rest with `message:history` from `replayFromSeq`.
pub const MAX_REPLAY: usize = 200;
/// Bound on the replay's encoded size, so a join reply stays far below the
/// bus's message size limit (NATS: 1 MiB by default).
pub const MAX_REPLAY_BYTES: usize = 512 * 1024;
/// Largest encoded history page (a reply must fit the bus: NATS carries
/// 1 MiB by default); past it the page is shorter and `hasMore` is true.
pub const MAX_PAGE_BYTES: usize = 512 * 1024;
/// Default and largest `message:history` page.
pub const HISTORY_DEFAULT: usize = 50;
pub const HISTORY_MAX: usize = 100;
/// How long a replica trusts its cached membership of a conversation.
pub const MEMBERSHIP_TTL: Duration = Duration::from_secs(10);

/// Most users one `presence:get` asks about.
pub const MAX_PRESENCE_GET: usize = 100;

/// Name of this service on the bus.
pub const SERVICE: &str = routes::CHAT;

/// Why a command was refused; each is one of the [`ClientError`] reasons.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChatError {
    /// Not a member of the conversation (or no such conversation).
    #[error("unauthorized")]
    Unauthorized,
    /// No such message in the conversation.
    #[error("not_found")]
    NotFound,
    /// Only the sender may change a message.
    #[error("forbidden")]
    Forbidden,
    #[error("message deleted")]
    MessageDeleted,
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
    /// The store did not answer (logged where it happened).
    #[error("service unavailable")]
    Unavailable,
    /// A refusal every service shares.
    #[error(transparent)]
    Refused(ClientError),
}

impl From<ChatError> for ClientError {
    fn from(err: ChatError) -> Self {
        match err {
            ChatError::Unauthorized => ClientError::Unauthorized,
            ChatError::NotFound => ClientError::NotFound,
            ChatError::Forbidden => ClientError::Forbidden,
            ChatError::MessageDeleted => ClientError::MessageDeleted,
            ChatError::InvalidPayload(m) => ClientError::InvalidPayload(m),
            ChatError::Unavailable => ClientError::Unavailable,
            ChatError::Refused(err) => err,
        }
    }
}

impl From<ClientError> for ChatError {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::InvalidPayload(m) => ChatError::InvalidPayload(m),
            other => ChatError::Refused(other),
        }
    }
}

impl From<StoreError> for ChatError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::ConversationNotFound => ChatError::Unauthorized,
            StoreError::MessageNotFound => ChatError::NotFound,
            StoreError::NotSender => ChatError::Forbidden,
            StoreError::MessageDeleted => ChatError::MessageDeleted,
            StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                ChatError::Unavailable
            }
        }
    }
}

pub struct ChatService {
    store: Arc<dyn ChatStore>,
    publisher: Publisher,
    members: moka::future::Cache<String, Arc<HashSet<String>>>,
    typing: Typing,
    presence: Option<Arc<dyn PresenceLookup>>,
    /// Orders `message:new` publications: see [`crate::turns`].
    send_turns: Turns,
}

/// Stripes of [`ChatService::send_turns`].
const SEND_TURNS: usize = 1024;

/// Most messages one gap fill returns ([`ChatService::missed`]).
pub const MAX_MISSED: usize = 200;

impl ChatService {
    pub fn new(store: Arc<dyn ChatStore>, bus: Arc<dyn Bus>, subjects: Subjects) -> Self {
        let members = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(MEMBERSHIP_TTL)
            .build();
        let publisher = Publisher::new(bus, subjects);
        Self {
            // Every store call is timed (quckchat_store_seconds).
            store: crate::store::Timed::wrap(store),
            typing: Typing::new(publisher.clone()),
            publisher,
            members,
            presence: None,
            send_turns: Turns::new(SEND_TURNS),
        }
    }

    /// Sends `presence_state` after each join, asked of `presence`.
    pub fn with_presence(mut self, presence: Arc<dyn PresenceLookup>) -> Self {
        self.presence = Some(presence);
        self
    }

    pub fn store(&self) -> &Arc<dyn ChatStore> {
        &self.store
    }

    /// Subject on which every replica hears membership changes.
    pub fn membership_subject(&self) -> String {
        self.publisher
            .subjects()
            .service_event(SERVICE, "membership")
    }

    /// Forgets cached membership (another replica changed it).
    pub async fn invalidate(&self, conversation_id: &str) {
        self.members.invalidate(conversation_id).await;
    }

    /// Answers a join or a push on `chat:<id>` (the kit checked the topic,
    /// the payload's shape and the event's name).
    async fn dispatch(&self, cmd: &Command) -> Result<Reply, ChatError> {
        let conversation_id = cmd.id.as_str();
        let p = &cmd.payload;
        let user = cmd.user_id.as_str();
        if cmd.is_join() {
            return self.join(conversation_id, user, p).await;
        }
        self.authorize(conversation_id, user).await?;
        let response = match cmd.event.as_str() {
            // The reply is the broadcast's body, encoded once for both.
            "message:send" => return Ok(Reply::new(self.send(conversation_id, user, p).await?)),
            "message:edit" => {
                let content = content_field(p)?;
                self.change(
                    conversation_id,
                    p,
                    MessageChange::Edit {
                        by: user.into(),
                        content,
                    },
                )
                .await?
            }
            "message:delete" => {
                self.change(
                    conversation_id,
                    p,
                    MessageChange::Delete { by: user.into() },
                )
                .await?
            }
            "message:reaction:add" => {
                let emoji = emoji_field(p)?;
                self.change(
                    conversation_id,
                    p,
                    MessageChange::AddReaction {
                        by: user.into(),
                        emoji,
                    },
                )
                .await?
            }
            "message:reaction:remove" => {
                let emoji = emoji_field(p)?;
                self.change(
                    conversation_id,
                    p,
                    MessageChange::RemoveReaction {
                        by: user.into(),
                        emoji,
                    },
                )
                .await?
            }
            "typing:start" => {
                self.typing.start(conversation_id, user).await;
                json!({})
            }
            "typing:stop" => {
                self.typing.stop(conversation_id, user).await;
                json!({})
            }
            "message:read" => self.read(conversation_id, user, p).await?,
            "message:history" => self.history_event(conversation_id, p).await?,
            "presence:get" => self.presence_get(conversation_id, p).await?,
            other => return Err(ClientError::UnknownEvent(other.to_owned()).into()),
        };
        Ok(response.into())
    }

    /// Whether `user_id` is a member right now (cached).
    /// Whether `user_id` may act in `conversation_id`, checked as for a
    /// socket push: for backend calls that act for a user.
    pub(crate) async fn check_member(
        &self,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<(), ChatError> {
        self.authorize(conversation_id, user_id).await
    }

    async fn authorize(&self, conversation_id: &str, user_id: &str) -> Result<(), ChatError> {
        if self.members(conversation_id).await?.contains(user_id) {
            Ok(())
        } else {
            Err(ChatError::Unauthorized)
        }
    }

    /// The conversation's members, cached ([`MEMBERSHIP_TTL`], dropped on
    /// membership changes). Concurrent misses read the store once: the
    /// first joins of a 10,000-member conversation do not each read its
    /// 10,000 members.
    async fn members(&self, conversation_id: &str) -> Result<Arc<HashSet<String>>, ChatError> {
        let store = &self.store;
        self.members
            .try_get_with_by_ref(conversation_id, async move {
                let conv = store
                    .conversation(conversation_id)
                    .await?
                    .ok_or(StoreError::ConversationNotFound)?;
                Ok(Arc::new(conv.member_ids.into_iter().collect()))
            })
            .await
            .map_err(|err: Arc<StoreError>| match &*err {
                StoreError::ConversationNotFound => ChatError::Unauthorized,
                other => other.clone().into(),
            })
    }

    async fn join(
        &self,
        conversation_id: &str,
        user_id: &str,
        p: &Payload,
    ) -> Result<Reply, ChatError> {
        let last_seen = p.opt_u64("lastSeq")?;
        // Membership is read fresh (a point lookup, whatever the size): a
        // member added a moment ago joins at once.
        let state = self
            .store
            .join_state(conversation_id, user_id)
            .await?
            .ok_or(ChatError::Unauthorized)?;
        if let Some(cached) = self.members.get(conversation_id).await {
            if !cached.contains(user_id) {
                // Cached before this member was added.
                self.members.invalidate(conversation_id).await;
            }
        }
        let mut response = json!({
            "conversationId": conversation_id,
            "lastSeq": state.last_seq,
            "readUpTo": state.read_up_to,
        });
        let mut followups = Vec::new();
        if let Some(presence) = &self.presence {
            let members = self.members(conversation_id).await?;
            if members.len() > MAX_PRESENCE_MEMBERS {
                // Too many to list: an empty state, so Phoenix Presence
                // clients sync (see docs/protocol.md#presence).
                followups.push(("presence_state".to_owned(), json!({})));
            } else {
                let ids: Vec<String> = members.iter().cloned().collect();
                match tokio::time::timeout(PRESENCE_TIMEOUT, presence.presence_state(&ids)).await {
                    Ok(Ok(state)) => followups.push(("presence_state".to_owned(), state)),
                    Ok(Err(err)) => {
                        tracing::warn!(%err, "presence unavailable: join without presence_state")
                    }
                    Err(_) => tracing::warn!("presence timed out: join without presence_state"),
                }
            }
        }
        if let Some(last_seen) = last_seen {
            let replay = self
                .store
                .changes_since(conversation_id, last_seen, MAX_REPLAY)
                .await?;
            let (events, complete, from_seq) = replay_events(replay);
            followups.extend(events);
            response["replayComplete"] = json!(complete);
            if let Some(seq) = from_seq.filter(|_| !complete) {
                response["replayFromSeq"] = json!(seq);
            }
        }
        Ok(Reply {
            response: response.into(),
            followups,
        })
    }

    async fn send(
        &self,
        conversation_id: &str,
        user_id: &str,
        p: &Payload,
    ) -> Result<Response, ChatError> {
        let new = parse_send(conversation_id, user_id, p)?;
        Ok(Response::Encoded(self.store_and_broadcast(new).await?.1))
    }

    /// Stores a message (after checking `replyTo`) and broadcasts it when new.
    pub async fn post(&self, new: NewMessage) -> Result<Message, ChatError> {
        Ok(self.store_and_broadcast(new).await?.0)
    }

    /// [`Self::post`], also returning the `{message}` body the broadcast
    /// carried (JSON), encoded once for the broadcast and the sender's reply.
    async fn store_and_broadcast(&self, new: NewMessage) -> Result<(Message, Vec<u8>), ChatError> {
        if let Some(reply_to) = &new.reply_to {
            if self
                .store
                .message(&new.conversation_id, &MessageRef::Id(reply_to.clone()))
                .await?
                .is_none()
            {
                return Err(ChatError::InvalidPayload(
                    "replyTo must name a message of this conversation".into(),
                ));
            }
        }
        let conversation_id = new.conversation_id.clone();
        // This replica publishes message:new in seq order — a client that saw
        // seq N has seen every seq before it, and rejoining with lastSeq
        // misses none — without holding anything across the commit: the
        // append starts in turn order (the store assigns seq in call order)
        // and publishes after the earlier turns of its conversation did.
        let (mut turn, appending) = self
            .send_turns
            .take(&conversation_id, || self.store.append_message(new));
        let appended = appending.await?;
        let body = message_body(&appended.message)?;
        turn.wait().await;
        // A retried send (deduplicated: `created` false) is published again:
        // its first broadcast may be what got lost. Clients dedupe by id.
        let topic = format!("chat:{conversation_id}");
        if let Err(err) = self
            .publisher
            .to_topic_sequenced(
                &topic,
                "message:new",
                body.clone(),
                None,
                appended.message.seq,
            )
            .await
        {
            tracing::warn!(%err, %topic, "message:new not published");
        }
        drop(turn);
        self.hand_to_push(&appended.message).await;
        Ok((appended.message, body))
    }

    /// Tells push-svc about a stored message (members with no live
    /// connection get a push). A retried send is handed over again: push-svc
    /// dedupes by message and device.
    async fn hand_to_push(&self, m: &Message) {
        let notice = MessagePush {
            conversation_id: m.conversation_id.clone(),
            message_id: m.id.clone(),
            seq: m.seq,
            sender_id: m.sender_id.clone(),
            preview: push::preview(&m.content),
            message_type: m.kind.clone(),
            created_at_ms: m.created_at.timestamp_millis(),
        };
        if let Err(err) = self
            .publisher
            .notice(routes::PUSH, push::MESSAGE_NOTICE, notice.encode_to_vec())
            .await
        {
            tracing::warn!(%err, "message push hand-off not published");
        }
    }

    /// The `message:new` events of `conversation_id` with seq strictly
    /// between `after_seq` and `before_seq` (a gateway missed them), in seq
    /// order, at most [`MAX_MISSED`] (the newest of the range).
    pub async fn missed(
        &self,
        conversation_id: &str,
        after_seq: u64,
        before_seq: u64,
    ) -> Result<Vec<(u64, Value)>, ChatError> {
        let span = before_seq.saturating_sub(after_seq).saturating_sub(1);
        let limit = usize::try_from(span).unwrap_or(MAX_MISSED).min(MAX_MISSED);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let page = self
            .store
            .history(conversation_id, Some(before_seq), limit)
            .await?;
        Ok(page
            .messages
            .into_iter()
            .filter(|m| m.seq > after_seq)
            .map(|m| (m.seq, json!({ "message": m })))
            .collect())
    }

    async fn change(
        &self,
        conversation_id: &str,
        p: &Payload,
        change: MessageChange,
    ) -> Result<Value, ChatError> {
        let message_id = p.str("messageId")?;
        if !valid_id(message_id) {
            return Err(ChatError::NotFound);
        }
        let updated = self
            .store
            .update_message(conversation_id, message_id, &change)
            .await?;
        let m = &updated.message;
        let (event, payload, response) = match &change {
            MessageChange::Edit { .. } => (
                "message:edited",
                json!({ "message": m }),
                json!({ "message": m }),
            ),
            MessageChange::Delete { .. } => (
                "message:deleted",
                deleted_payload(m),
                json!({ "messageId": m.id }),
            ),
            MessageChange::AddReaction { by, emoji } => (
                "message:reaction:added",
                json!({ "messageId": m.id, "userId": by, "emoji": emoji }),
                json!({ "messageId": m.id, "reactions": m.reactions }),
            ),
            MessageChange::RemoveReaction { by, emoji } => (
                "message:reaction:removed",
                json!({ "messageId": m.id, "userId": by, "emoji": emoji }),
                json!({ "messageId": m.id, "reactions": m.reactions }),
            ),
        };
        if updated.changed {
            self.broadcast(conversation_id, event, &payload, None).await;
        }
        Ok(response)
    }

    async fn read(
        &self,
        conversation_id: &str,
        user_id: &str,
        p: &Payload,
    ) -> Result<Value, ChatError> {
        let which = match (p.opt_str("messageId")?, p.opt_u64("seq")?) {
            (Some(id), _) if valid_id(id) => MessageRef::Id(id.to_owned()),
            (Some(_), _) => return Err(ChatError::NotFound),
            (None, Some(seq)) if seq >= 1 => MessageRef::Seq(seq),
            (None, Some(_)) => {
                return Err(ChatError::InvalidPayload("seq must be at least 1".into()))
            }
            (None, None) => {
                return Err(ChatError::InvalidPayload(
                    "messageId or seq is required".into(),
                ))
            }
        };
        let m = self
            .store
            .message(conversation_id, &which)
            .await?
            .ok_or(ChatError::NotFound)?;
        let state = self
            .store
            .mark_read(conversation_id, user_id, m.seq)
            .await?;
        if state.advanced {
            let receipt = json!({
                "userId": user_id,
                "conversationId": conversation_id,
                "messageId": m.id,
                "seq": m.seq,
                "readAt": quckchat_runtime::time::now_iso(),
            });
            self.broadcast(conversation_id, "message:read", &receipt, Some(user_id))
                .await;
        }
        Ok(json!({ "readUpTo": state.read_up_to }))
    }

    /// `presence:get {userIds}`: the presence of up to [`MAX_PRESENCE_GET`]
    /// members, in `presence_state`'s shape; ids of non-members and of
    /// members offline are absent. How members of a conversation too big for
    /// per-member presence on its topic see who is online.
    async fn presence_get(&self, conversation_id: &str, p: &Payload) -> Result<Value, ChatError> {
        let invalid = || {
            ChatError::InvalidPayload(format!(
                "userIds must be an array of 1 to {MAX_PRESENCE_GET} user ids"
            ))
        };
        let asked = p
            .get("userIds")
            .and_then(Value::as_array)
            .ok_or_else(invalid)?;
        if asked.is_empty() || asked.len() > MAX_PRESENCE_GET {
            return Err(invalid());
        }
        let members = self.members(conversation_id).await?;
        let mut ids = Vec::with_capacity(asked.len());
        for id in asked {
            let id = id.as_str().filter(|id| valid_id(id)).ok_or_else(invalid)?;
            if members.contains(id) && !ids.iter().any(|known: &String| known == id) {
                ids.push(id.to_owned());
            }
        }
        let Some(presence) = &self.presence else {
            tracing::debug!("presence:get with no presence service configured");
            return Err(ChatError::Unavailable);
        };
        if ids.is_empty() {
            return Ok(json!({ "presence": {} }));
        }
        match tokio::time::timeout(PRESENCE_TIMEOUT, presence.presence_state(&ids)).await {
            Ok(Ok(state)) => Ok(json!({ "presence": state })),
            Ok(Err(err)) => {
                tracing::warn!(%err, "presence unavailable: presence:get not answered");
                Err(ChatError::Unavailable)
            }
            Err(_) => {
                tracing::warn!("presence timed out: presence:get not answered");
                Err(ChatError::Unavailable)
            }
        }
    }

    async fn history_event(&self, conversation_id: &str, p: &Payload) -> Result<Value, ChatError> {
        let before = p.opt_u64("beforeSeq")?;
        let limit = match p.opt_u64("limit")? {
            None => HISTORY_DEFAULT,
            Some(n) if (1..=HISTORY_MAX as u64).contains(&n) => n as usize,
            Some(_) => {
                return Err(ChatError::InvalidPayload(format!(
                    "limit must be 1 to {HISTORY_MAX}"
                )))
            }
        };
        let page = self.history(conversation_id, before, limit).await?;
        Ok(json!({ "messages": page.messages, "hasMore": page.has_more }))
    }

    /// A page of history (for the event and for gRPC).
    pub async fn history(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<Page, ChatError> {
        let mut page = self
            .store
            .history(conversation_id, before_seq, limit.clamp(1, HISTORY_MAX))
            .await?;
        // Keep the page within MAX_PAGE_BYTES, dropping its oldest messages:
        // the client pages on from the first one it got.
        let mut budget = MAX_PAGE_BYTES;
        let keep = page
            .messages
            .iter()
            .rev()
            .take_while(|m| {
                let size = serde_json::to_vec(m).map_or(usize::MAX, |v| v.len());
                budget = budget.saturating_sub(size);
                budget > 0
            })
            .count()
            .max(1);
        if keep < page.messages.len() {
            page.messages.drain(..page.messages.len() - keep);
            page.has_more = true;
        }
        Ok(page)
    }

    /// Replaces a conversation's members; members removed lose their open
    /// channels at once.
    pub async fn set_members(
        &self,
        conversation_id: &str,
        member_ids: &[String],
    ) -> Result<Conversation, StoreError> {
        let before = self.store.conversation(conversation_id).await?;
        let conv = self
            .store
            .upsert_conversation(conversation_id, member_ids)
            .await?;
        let removed: Vec<String> = before
            .map(|b| {
                b.member_ids
                    .into_iter()
                    .filter(|m| !conv.has_member(m))
                    .collect()
            })
            .unwrap_or_default();
        self.membership_changed(conversation_id, &removed).await;
        Ok(conv)
    }

    pub async fn remove_member(
        &self,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<Conversation, StoreError> {
        let conv = self.store.remove_member(conversation_id, user_id).await?;
        self.membership_changed(conversation_id, &[user_id.to_owned()])
            .await;
        Ok(conv)
    }

    /// Tells every replica to drop cached membership, and closes the removed
    /// members' channels on every gateway.
    async fn membership_changed(&self, conversation_id: &str, removed: &[String]) {
        self.members.invalidate(conversation_id).await;
        if let Err(err) = self
            .publisher
            .notice(SERVICE, "membership", conversation_id)
            .await
        {
            tracing::warn!(%err, "membership change not announced");
        }
        self.close_channels(conversation_id, removed).await;
    }

    /// Closes `users`' channels on the conversation's topic, on every gateway.
    async fn close_channels(&self, conversation_id: &str, users: &[String]) {
        let topic = format!("chat:{conversation_id}");
        for user in users {
            if let Err(err) = self.publisher.close_channel(user, &topic, "removed").await {
                tracing::warn!(%err, user, "channel close not sent");
            }
        }
    }

    /// Follows membership changes others write to the store (the backend
    /// updating MongoDB): drops the cached membership and closes the
    /// channels of members this replica knew and the change removed. Other
    /// removed members are refused at their next push. When the watch
    /// breaks or cannot start (the database is down) it is started again,
    /// every second at first and at most every 10 s, for as long as the
    /// service runs; after a break every cached membership is dropped, so
    /// changes made meanwhile apply at the next push. Ends with `shutdown`.
    pub async fn watch_memberships(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        const FIRST_RETRY: Duration = Duration::from_secs(1);
        const LAST_RETRY: Duration = Duration::from_secs(10);
        let mut retry = FIRST_RETRY;
        let mut broke = false;
        loop {
            match self.store.membership_changes().await {
                Ok(None) => return,
                Ok(Some(mut changes)) => {
                    if broke {
                        tracing::info!("conversation change stream back");
                        self.members.invalidate_all();
                    }
                    retry = FIRST_RETRY;
                    loop {
                        let change = tokio::select! {
                            () = shutdown.cancelled() => return,
                            change = futures::StreamExt::next(&mut changes) => change,
                        };
                        let Some(change) = change else { break };
                        let removed: Vec<String> =
                            match self.members.get(&change.conversation_id).await {
                                Some(known) => known
                                    .iter()
                                    .filter(|m| !change.member_ids.contains(m))
                                    .cloned()
                                    .collect(),
                                None => Vec::new(),
                            };
                        self.members.invalidate(&change.conversation_id).await;
                        self.close_channels(&change.conversation_id, &removed).await;
                    }
                    tracing::warn!("conversation change stream ended: watching again");
                }
                Err(err) => tracing::warn!(
                    %err,
                    retry_in_ms = retry.as_millis(),
                    "cannot watch conversations: backend membership changes apply after the cache TTL until it can"
                ),
            }
            broke = true;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(LAST_RETRY);
        }
    }

    /// Publishes an event to every subscriber of the conversation's topic
    /// (but `except_user`). The state is already stored: a lost broadcast is
    /// recovered by clients rejoining with `lastSeq`, so failure is logged.
    async fn broadcast(
        &self,
        conversation_id: &str,
        event: &str,
        payload: &Value,
        except_user: Option<&str>,
    ) {
        let topic = format!("chat:{conversation_id}");
        if let Err(err) = self
            .publisher
            .to_topic(&topic, event, payload, except_user)
            .await
        {
            tracing::warn!(%err, %topic, event, "broadcast not published");
        }
    }
}

#[async_trait]
impl Service for ChatService {
    type Error = ChatError;

    fn name(&self) -> &'static str {
        SERVICE
    }

    fn events(&self) -> &'static [&'static str] {
        KNOWN_EVENTS
    }

    async fn handle(&self, cmd: Command) -> Result<Reply, ChatError> {
        self.dispatch(&cmd).await
    }
}

const KNOWN_EVENTS: &[&str] = &[
    "message:send",
    "message:edit",
    "message:delete",
    "message:reaction:add",
    "message:reaction:remove",
    "typing:start",
    "typing:stop",
    "message:read",
    "message:history",
    "presence:get",
];

fn deleted_payload(m: &Message) -> Value {
    json!({
        "messageId": m.id,
        "conversationId": m.conversation_id,
        "deletedAt": m.deleted_at.map(quckchat_runtime::time::iso),
    })
}

/// `{"message": ...}`, encoded: the body of `message:new` and of the
/// sender's reply, serialized from the message itself (no `Value` tree built
/// first). Cannot fail for a stored message (string keys only); if it did,
/// the send is answered as unavailable and the client's retry (same
/// `clientMessageId`) publishes the stored message.
fn message_body(message: &Message) -> Result<Vec<u8>, ChatError> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        message: &'a Message,
    }
    serde_json::to_vec(&Body { message }).map_err(|err| {
        tracing::error!(%err, "message body not encoded");
        ChatError::Unavailable
    })
}

/// Turns a replay into channel events: changes to messages the client has
/// (edited state, or deleted), then the new messages, oldest first, within
/// [`MAX_REPLAY_BYTES`]. Returns the events, whether nothing was left out,
/// and the seq of the first new message sent.
fn replay_events(replay: crate::store::Replay) -> (Vec<(String, Value)>, bool, Option<u64>) {
    let mut complete = replay.complete;
    let mut budget = MAX_REPLAY_BYTES;
    let mut take = |event: &str, payload: Value| -> Option<(String, Value)> {
        let size = serde_json::to_vec(&payload).map_or(usize::MAX, |b| b.len());
        if size > budget {
            return None;
        }
        budget -= size;
        Some((event.to_owned(), payload))
    };
    // Newest messages first against the budget, so what is cut is the oldest.
    let mut new_events = Vec::new();
    let mut first_seq = None;
    for m in replay.new.iter().rev() {
        match take("message:new", json!({ "message": m })) {
            Some(ev) => {
                new_events.push(ev);
                first_seq = Some(m.seq);
            }
            None => {
                complete = false;
                break;
            }
        }
    }
    new_events.reverse();
    let mut events = Vec::new();
    for m in &replay.changed {
        let ev = if m.deleted_at.is_some() {
            take("message:deleted", deleted_payload(m))
        } else {
            take("message:edited", json!({ "message": m }))
        };
        match ev {
            Some(ev) => events.push(ev),
            None => {
                complete = false;
                break;
            }
        }
    }
    events.extend(new_events);
    (events, complete, first_seq)
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
