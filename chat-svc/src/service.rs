//! The chat service's logic: joins and client pushes on `chat:<id>` topics
//! (docs/protocol.md#chat-join, #chat-events) and the operations internal callers use over gRPC,
//! independent of how either arrives.
//!
//! Every command is authorised: the sender must be a member of the
//! conversation right now. Membership is cached per replica and invalidated
//! on every replica when it changes through this service, or when the
//! backend changes MongoDB directly (change stream); at worst it is
//! [`MEMBERSHIP_TTL`] old.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use quckchat_proto::bus::{
    command_reply, direct_event, ChannelEvent, ClientCommand, CloseChannel, CommandReply,
    DirectEvent, TopicEvent,
};
use quckchat_runtime::bus::{Bus, Subjects};
use quckchat_runtime::ids::valid_id;
use serde_json::{json, Map, Value};

use crate::presence::{PresenceLookup, PRESENCE_TIMEOUT};
use crate::store::{
    ChatStore, Conversation, Message, MessageChange, MessageRef, NewMessage, Page, StoreError,
    MESSAGE_TYPES,
};
use crate::turns::Turns;

/// Longest message content, in characters.
pub const MAX_CONTENT_CHARS: usize = 10_000;
/// Longest `clientMessageId`.
pub const MAX_CLIENT_MESSAGE_ID: usize = 128;
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
/// A typing indicator without `typing:stop` ends by itself after this.
pub const TYPING_EXPIRY: Duration = Duration::from_secs(8);
/// Repeated `typing:start` within this window is not re-broadcast.
pub const TYPING_THROTTLE: Duration = Duration::from_secs(3);
/// How long a replica trusts its cached membership of a conversation.
pub const MEMBERSHIP_TTL: Duration = Duration::from_secs(10);

/// Name of this service on the bus.
pub const SERVICE: &str = "chat";

/// Why a command was refused; each maps to the reply's `reason`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChatError {
    #[error("unauthorized")]
    Unauthorized,
    #[error("not_found")]
    NotFound,
    #[error("forbidden")]
    Forbidden,
    #[error("message deleted")]
    MessageDeleted,
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
    #[error("unknown event")]
    UnknownEvent(String),
    #[error("invalid topic")]
    InvalidTopic,
    #[error("service unavailable")]
    Unavailable,
}

impl ChatError {
    fn response(&self) -> Value {
        match self {
            ChatError::UnknownEvent(event) => json!({"reason": "unknown event", "event": event}),
            other => json!({"reason": other.to_string()}),
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

/// What a handled command produces.
struct Outcome {
    response: Value,
    followups: Vec<ChannelEvent>,
}

impl From<Value> for Outcome {
    fn from(response: Value) -> Self {
        Self {
            response,
            followups: Vec::new(),
        }
    }
}

pub struct ChatService {
    store: Arc<dyn ChatStore>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    members: moka::future::Cache<String, Arc<HashSet<String>>>,
    typing: Typing,
    presence: Option<Arc<dyn PresenceLookup>>,
    /// Orders `message:new` publications: see [`crate::turns`].
    send_turns: Turns,
}

/// Stripes of [`ChatService::send_turns`].
const SEND_TURNS: usize = 1024;

impl ChatService {
    pub fn new(store: Arc<dyn ChatStore>, bus: Arc<dyn Bus>, subjects: Subjects) -> Self {
        let members = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(MEMBERSHIP_TTL)
            .build();
        let typing = Typing::new(bus.clone(), subjects.clone());
        Self {
            store,
            bus,
            subjects,
            members,
            typing,
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
        self.subjects.service_event(SERVICE, "membership")
    }

    /// Forgets cached membership (another replica changed it).
    pub async fn invalidate(&self, conversation_id: &str) {
        self.members.invalidate(conversation_id).await;
    }

    /// Handles one command and builds the reply the client will see.
    pub async fn handle(&self, cmd: &ClientCommand) -> CommandReply {
        let result = self.dispatch(cmd).await;
        // Only known names become label values (static, no allocation):
        // clients choose event names.
        let event: &'static str = std::iter::once(&"phx_join")
            .chain(KNOWN_EVENTS)
            .find(|known| **known == cmd.event)
            .copied()
            .unwrap_or("other");
        metrics::counter!(
            "quckchat_chat_commands_total",
            "event" => event,
            "result" => if result.is_ok() { "ok" } else { "error" },
        )
        .increment(1);
        match result {
            Ok(outcome) => CommandReply {
                status: command_reply::Status::Ok as i32,
                response: outcome.response.to_string().into_bytes(),
                followups: outcome.followups,
            },
            Err(e) => CommandReply {
                status: command_reply::Status::Error as i32,
                response: e.response().to_string().into_bytes(),
                followups: Vec::new(),
            },
        }
    }

    async fn dispatch(&self, cmd: &ClientCommand) -> Result<Outcome, ChatError> {
        let conversation_id = cmd
            .topic
            .strip_prefix("chat:")
            .filter(|id| valid_id(id))
            .ok_or(ChatError::InvalidTopic)?;
        let p = parse_object(&cmd.payload)?;
        let user = cmd.user_id.as_str();
        if cmd.event == "phx_join" {
            return self.join(conversation_id, user, &p).await;
        }
        if !KNOWN_EVENTS.contains(&cmd.event.as_str()) {
            return Err(ChatError::UnknownEvent(cmd.event.clone()));
        }
        self.authorize(conversation_id, user).await?;
        let response = match cmd.event.as_str() {
            "message:send" => self.send(conversation_id, user, &p).await?,
            "message:edit" => {
                let content = content_field(&p)?;
                self.change(
                    conversation_id,
                    &p,
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
                    &p,
                    MessageChange::Delete { by: user.into() },
                )
                .await?
            }
            "message:reaction:add" => {
                let emoji = emoji_field(&p)?;
                self.change(
                    conversation_id,
                    &p,
                    MessageChange::AddReaction {
                        by: user.into(),
                        emoji,
                    },
                )
                .await?
            }
            "message:reaction:remove" => {
                let emoji = emoji_field(&p)?;
                self.change(
                    conversation_id,
                    &p,
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
            "message:read" => self.read(conversation_id, user, &p).await?,
            "message:history" => self.history_event(conversation_id, &p).await?,
            other => return Err(ChatError::UnknownEvent(other.to_owned())),
        };
        Ok(response.into())
    }

    /// Whether `user_id` is a member right now (cached).
    async fn authorize(&self, conversation_id: &str, user_id: &str) -> Result<(), ChatError> {
        let members = match self.members.get(conversation_id).await {
            Some(m) => m,
            None => {
                let conv = self
                    .store
                    .conversation(conversation_id)
                    .await?
                    .ok_or(ChatError::Unauthorized)?;
                self.remember(&conv).await
            }
        };
        if members.contains(user_id) {
            Ok(())
        } else {
            Err(ChatError::Unauthorized)
        }
    }

    async fn remember(&self, conv: &Conversation) -> Arc<HashSet<String>> {
        let members = Arc::new(conv.member_ids.iter().cloned().collect::<HashSet<_>>());
        self.members.insert(conv.id.clone(), members.clone()).await;
        members
    }

    async fn join(
        &self,
        conversation_id: &str,
        user_id: &str,
        p: &Map<String, Value>,
    ) -> Result<Outcome, ChatError> {
        let last_seen = opt_u64(p, "lastSeq")?;
        let conv = self
            .store
            .conversation(conversation_id)
            .await?
            .ok_or(ChatError::Unauthorized)?;
        self.remember(&conv).await;
        if !conv.has_member(user_id) {
            return Err(ChatError::Unauthorized);
        }
        let read_up_to = self.store.read_up_to(conversation_id, user_id).await?;
        let mut response = json!({
            "conversationId": conv.id,
            "lastSeq": conv.last_seq,
            "readUpTo": read_up_to,
        });
        let mut followups = Vec::new();
        if let Some(presence) = &self.presence {
            match tokio::time::timeout(PRESENCE_TIMEOUT, presence.presence_state(&conv.member_ids))
                .await
            {
                Ok(Ok(state)) => followups.push(ChannelEvent {
                    event: "presence_state".into(),
                    payload: state.to_string().into_bytes(),
                }),
                Ok(Err(err)) => {
                    tracing::warn!(%err, "presence unavailable: join without presence_state")
                }
                Err(_) => tracing::warn!("presence timed out: join without presence_state"),
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
        Ok(Outcome {
            response,
            followups,
        })
    }

    async fn send(
        &self,
        conversation_id: &str,
        user_id: &str,
        p: &Map<String, Value>,
    ) -> Result<Value, ChatError> {
        let new = parse_send(conversation_id, user_id, p)?;
        Ok(self.store_and_broadcast(new).await?.1)
    }

    /// Stores a message (after checking `replyTo`) and broadcasts it when new.
    pub async fn post(&self, new: NewMessage) -> Result<Message, ChatError> {
        Ok(self.store_and_broadcast(new).await?.0)
    }

    /// [`Self::post`], also returning the `{message}` body the broadcast
    /// carried, built once for the broadcast and the sender's reply.
    async fn store_and_broadcast(&self, new: NewMessage) -> Result<(Message, Value), ChatError> {
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
        let body = json!({ "message": appended.message });
        turn.wait().await;
        if appended.created {
            self.broadcast(&conversation_id, "message:new", &body, None)
                .await;
        }
        drop(turn);
        Ok((appended.message, body))
    }

    async fn change(
        &self,
        conversation_id: &str,
        p: &Map<String, Value>,
        change: MessageChange,
    ) -> Result<Value, ChatError> {
        let message_id = req_str(p, "messageId")?;
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
        p: &Map<String, Value>,
    ) -> Result<Value, ChatError> {
        let which = match (opt_str(p, "messageId")?, opt_u64(p, "seq")?) {
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

    async fn history_event(
        &self,
        conversation_id: &str,
        p: &Map<String, Value>,
    ) -> Result<Value, ChatError> {
        let before = opt_u64(p, "beforeSeq")?;
        let limit = match opt_u64(p, "limit")? {
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
        let subject = self.membership_subject();
        let id = Bytes::from(conversation_id.to_owned());
        if let Err(err) = self.bus.publish(&subject, None, Vec::new(), id).await {
            tracing::warn!(%err, "membership change not announced");
        }
        self.close_channels(conversation_id, removed).await;
    }

    /// Closes `users`' channels on the conversation's topic, on every gateway.
    async fn close_channels(&self, conversation_id: &str, users: &[String]) {
        let close = DirectEvent {
            topic: format!("chat:{conversation_id}"),
            kind: Some(direct_event::Kind::Close(CloseChannel {
                reason: "removed".into(),
            })),
        }
        .encode_to_vec();
        for user in users {
            let subject = self.subjects.user(user);
            let payload = Bytes::from(close.clone());
            if let Err(err) = self.bus.publish(&subject, None, Vec::new(), payload).await {
                tracing::warn!(%err, user, "channel close not sent");
            }
        }
    }

    /// Follows membership changes others write to the store (the backend
    /// updating MongoDB): drops the cached membership and closes the
    /// channels of members this replica knew and the change removed. Other
    /// removed members are refused at their next push. Retries the watch
    /// after an error; ends with `shutdown`.
    pub async fn watch_memberships(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let Some(mut changes) = self.store.membership_changes().await else {
                return;
            };
            loop {
                let change = tokio::select! {
                    () = shutdown.cancelled() => return,
                    change = futures::StreamExt::next(&mut changes) => change,
                };
                let Some(change) = change else { break };
                let removed: Vec<String> = match self.members.get(&change.conversation_id).await {
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
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
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
        publish_topic(
            self.bus.as_ref(),
            &self.subjects,
            conversation_id,
            event,
            payload,
            except_user,
        )
        .await;
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
];

async fn publish_topic(
    bus: &dyn Bus,
    subjects: &Subjects,
    conversation_id: &str,
    event: &str,
    payload: &Value,
    except_user: Option<&str>,
) {
    let topic = format!("chat:{conversation_id}");
    let ev = TopicEvent {
        topic: topic.clone(),
        event: event.to_owned(),
        payload: payload.to_string().into_bytes(),
        exclude_user_id: except_user.unwrap_or_default().to_owned(),
    };
    let subject = subjects.topic(&topic);
    if let Err(err) = bus
        .publish(&subject, None, Vec::new(), Bytes::from(ev.encode_to_vec()))
        .await
    {
        tracing::warn!(%err, %subject, event, "broadcast not published");
    }
}

fn deleted_payload(m: &Message) -> Value {
    json!({
        "messageId": m.id,
        "conversationId": m.conversation_id,
        "deletedAt": m.deleted_at.map(quckchat_runtime::time::iso),
    })
}

/// Turns a replay into channel events: changes to messages the client has
/// (edited state, or deleted), then the new messages, oldest first, within
/// [`MAX_REPLAY_BYTES`]. Returns the events, whether nothing was left out,
/// and the seq of the first new message sent.
fn replay_events(replay: crate::store::Replay) -> (Vec<ChannelEvent>, bool, Option<u64>) {
    let mut complete = replay.complete;
    let mut budget = MAX_REPLAY_BYTES;
    let mut take = |event: &str, payload: Value| -> Option<ChannelEvent> {
        let bytes = payload.to_string().into_bytes();
        if bytes.len() > budget {
            return None;
        }
        budget -= bytes.len();
        Some(ChannelEvent {
            event: event.to_owned(),
            payload: bytes,
        })
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

/// Typing indicators: not stored, sent to the others only, throttled, and
/// ended by the service when the client does not (after [`TYPING_EXPIRY`]).
/// Kept per replica: a `typing:stop` handled by another replica only makes
/// this one's expiry send a second, harmless stop.
struct Typing {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    active: Arc<Mutex<HashMap<(String, String), TypingState>>>,
}

struct TypingState {
    last_broadcast: Instant,
    generation: u64,
}

impl Typing {
    fn new(bus: Arc<dyn Bus>, subjects: Subjects) -> Self {
        Self {
            bus,
            subjects,
            active: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    async fn start(&self, conversation_id: &str, user_id: &str) {
        let key = (conversation_id.to_owned(), user_id.to_owned());
        let (announce, generation) = {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let state = active.entry(key.clone()).or_insert(TypingState {
                last_broadcast: now.checked_sub(TYPING_THROTTLE * 2).unwrap_or(now),
                generation: 0,
            });
            state.generation += 1;
            let announce = now.duration_since(state.last_broadcast) >= TYPING_THROTTLE;
            if announce {
                state.last_broadcast = now;
            }
            (announce, state.generation)
        };
        if announce {
            self.publish(conversation_id, user_id, "typing:start").await;
        }
        let (active, bus, subjects) =
            (self.active.clone(), self.bus.clone(), self.subjects.clone());
        tokio::spawn(async move {
            tokio::time::sleep(TYPING_EXPIRY).await;
            let expired = {
                let mut active = active.lock().unwrap_or_else(|e| e.into_inner());
                let current = active.get(&key).is_some_and(|s| s.generation == generation);
                if current {
                    active.remove(&key);
                }
                current
            };
            if expired {
                let payload = json!({ "userId": key.1, "conversationId": key.0 });
                publish_topic(
                    bus.as_ref(),
                    &subjects,
                    &key.0,
                    "typing:stop",
                    &payload,
                    Some(&key.1),
                )
                .await;
            }
        });
    }

    async fn stop(&self, conversation_id: &str, user_id: &str) {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(conversation_id.to_owned(), user_id.to_owned()));
        self.publish(conversation_id, user_id, "typing:stop").await;
    }

    async fn publish(&self, conversation_id: &str, user_id: &str, event: &str) {
        let payload = json!({ "userId": user_id, "conversationId": conversation_id });
        publish_topic(
            self.bus.as_ref(),
            &self.subjects,
            conversation_id,
            event,
            &payload,
            Some(user_id),
        )
        .await;
    }
}

fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, ChatError> {
    if payload.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(Value::Null) => Ok(Map::new()),
        _ => Err(ChatError::InvalidPayload("expected an object".into())),
    }
}

fn invalid(msg: impl Into<String>) -> ChatError {
    ChatError::InvalidPayload(msg.into())
}

/// An optional string field (`null` counts as absent).
fn opt_str<'a>(p: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ChatError> {
    match p.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{field} must be a string"))),
    }
}

fn req_str<'a>(p: &'a Map<String, Value>, field: &str) -> Result<&'a str, ChatError> {
    opt_str(p, field)?.ok_or_else(|| invalid(format!("{field} is required")))
}

/// An optional non-negative integer field.
fn opt_u64(p: &Map<String, Value>, field: &str) -> Result<Option<u64>, ChatError> {
    match p.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(format!("{field} must be a non-negative integer"))),
    }
}

fn content_field(p: &Map<String, Value>) -> Result<String, ChatError> {
    let content = req_str(p, "content")?;
    if content.chars().count() > MAX_CONTENT_CHARS {
        return Err(invalid(format!(
            "content exceeds {MAX_CONTENT_CHARS} characters"
        )));
    }
    Ok(content.to_owned())
}

/// An emoji: one Unicode emoji (with skin tone or variation selector), or a
/// `:shortcode:` naming one.
fn emoji_field(p: &Map<String, Value>) -> Result<String, ChatError> {
    let emoji = req_str(p, "emoji")?;
    let known = emojis::get(emoji).is_some()
        || emoji
            .strip_prefix(':')
            .and_then(|s| s.strip_suffix(':'))
            .is_some_and(|code| emojis::get_by_shortcode(code).is_some());
    if known {
        Ok(emoji.to_owned())
    } else {
        Err(invalid("emoji must be a single emoji or a :shortcode:"))
    }
}

/// Largest `metadata`, encoded.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Metadata every store can keep as the client sent it: no `$` keys (MongoDB
/// operators), integers within 64-bit signed, nesting at most 16 deep.
fn check_metadata(v: &Value, depth: usize) -> Result<(), ChatError> {
    if depth > 16 {
        return Err(invalid("metadata is nested too deep"));
    }
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k.starts_with('$') {
                    return Err(invalid(format!(
                        "metadata keys must not start with $: {k:?}"
                    )));
                }
                check_metadata(v, depth + 1)?;
            }
            Ok(())
        }
        Value::Array(a) => a.iter().try_for_each(|v| check_metadata(v, depth + 1)),
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => Err(invalid(
            "metadata numbers must fit in 64-bit signed integers",
        )),
        _ => Ok(()),
    }
}

/// Validates a `message:send` payload.
pub fn parse_send(
    conversation_id: &str,
    user_id: &str,
    p: &Map<String, Value>,
) -> Result<NewMessage, ChatError> {
    if let Some(cid) = opt_str(p, "conversationId")? {
        if cid != conversation_id {
            return Err(invalid("conversationId does not match the topic"));
        }
    }
    let kind = req_str(p, "type")?;
    if !MESSAGE_TYPES.contains(&kind) {
        return Err(invalid(format!(
            "type must be one of {}",
            MESSAGE_TYPES.join(", ")
        )));
    }
    let content = content_field(p)?;
    if kind == "text" && content.trim().is_empty() {
        return Err(invalid("content must not be empty"));
    }
    let client_message_id = opt_str(p, "clientMessageId")?;
    if client_message_id.is_some_and(|c| c.is_empty() || c.len() > MAX_CLIENT_MESSAGE_ID) {
        return Err(invalid(format!(
            "clientMessageId must be 1 to {MAX_CLIENT_MESSAGE_ID} characters"
        )));
    }
    let reply_to = opt_str(p, "replyTo")?;
    if reply_to.is_some_and(|r| !valid_id(r)) {
        return Err(invalid("replyTo must name a message of this conversation"));
    }
    let metadata = match p.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            check_metadata(&Value::Object(m.clone()), 0)?;
            if serde_json::to_vec(m).map_or(usize::MAX, |v| v.len()) > MAX_METADATA_BYTES {
                return Err(invalid(format!(
                    "metadata exceeds {MAX_METADATA_BYTES} bytes"
                )));
            }
            Some(m.clone())
        }
        Some(_) => return Err(invalid("metadata must be an object")),
    };
    Ok(NewMessage {
        conversation_id: conversation_id.to_owned(),
        sender_id: user_id.to_owned(),
        kind: kind.to_owned(),
        content,
        client_message_id: client_message_id.map(str::to_owned),
        reply_to: reply_to.map(str::to_owned),
        metadata,
    })
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
