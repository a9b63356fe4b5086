//! `huddle:lobby` and `huddle:<id>`: the events of a huddle, from the
//! client's push to the room ([`crate::room`]) and out to the participants.
//!
//! Every change to a room is one atomic commit ([`crate::state`]); its
//! events go to the huddle's topic, each with the `version` the commit gave
//! it. Besides commands, each replica sweeps due departures (every
//! [`SWEEP_EVERY`]) and audits live participants' sockets with their
//! gateways (every `HUDDLE_AUDIT_SECS`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prost::Message as _;
use quckchat_proto::bus::ConnectionAudit;
use quckchat_runtime::bus::{Bus, BusError, Subjects};
use quckchat_runtime::errors::ClientError;
use quckchat_runtime::presence::MAX_AUDITED_CONNECTIONS;
use quckchat_runtime::publish::Publisher;
use quckchat_runtime::routes;
use quckchat_runtime::service::{self, Command, Reply, Service};
use quckchat_runtime::time::now_ms;
use quckchat_signaling::chat::Conversations;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::config::HuddleSettings;
use crate::huddle::{Huddle, Participant, Room, MAX_TITLE_BYTES};
use crate::room::{Change, EventKind, Joining, RoomError, RoomEvent};
use crate::state::{RoomState, StateError};
use crate::store::{HuddleStore, StoreError};

/// The topic id anyone may join to create huddles.
pub const LOBBY: &str = "lobby";
/// How often each replica looks for due departures.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// How long a gateway has to answer an audit.
pub const AUDIT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest SDP or ICE candidate relayed (bytes of JSON).
pub const MAX_RELAY_BYTES: usize = 64 * 1024;
/// Most users one `huddle:invite` names.
pub const MAX_INVITEES: usize = 50;
/// Commits lost to other replicas before a command gives up.
const MAX_TRIES: usize = 16;
/// Stripes of [`HuddleService::turn`].
const TURN_STRIPES: usize = 64;

const EVENTS: &[&str] = &[
    "huddle:create",
    "huddle:leave",
    "huddle:toggle-audio",
    "huddle:toggle-video",
    "huddle:toggle-screen",
    "huddle:raise-hand",
    "huddle:participants",
    "huddle:invite",
    "huddle:mute",
    "huddle:remove",
    "huddle:end",
    "webrtc:offer",
    "webrtc:answer",
    "webrtc:ice-candidate",
];

/// A refusal of this service.
#[derive(Debug, thiserror::Error)]
pub enum HuddleError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the room changed too often at once")]
    Contended,
}

impl From<HuddleError> for ClientError {
    fn from(err: HuddleError) -> Self {
        match err {
            HuddleError::Client(e) => e,
            HuddleError::Room(RoomError::Full) => ClientError::HuddleFull,
            HuddleError::Room(RoomError::ScreenInUse) => ClientError::ScreenInUse,
            HuddleError::Room(RoomError::NotParticipant) => ClientError::Forbidden,
            HuddleError::State(err) => {
                tracing::warn!(%err, "huddle state unavailable");
                ClientError::Unavailable
            }
            HuddleError::Store(err) => {
                tracing::warn!(%err, "huddle store unavailable");
                ClientError::Unavailable
            }
            HuddleError::Contended => {
                tracing::warn!("huddle changed too often at once: gave up");
                ClientError::Unavailable
            }
        }
    }
}

type Result<T> = std::result::Result<T, HuddleError>;

pub struct HuddleService {
    store: Arc<dyn HuddleStore>,
    state: Arc<dyn RoomState>,
    chat: Option<Arc<dyn Conversations>>,
    publisher: Publisher,
    settings: HuddleSettings,
    /// A replica's turns per huddle (striped): a room's changes are committed
    /// and published one at a time here, so this replica's events of a
    /// room leave in version order (two replicas may still interleave:
    /// clients re-read the list on a gap).
    turns: Box<[tokio::sync::Mutex<()>]>,
    /// Nodes whose audit found no gateway listening, and when: a node is
    /// taken for dead only on the second such audit in a row (a gateway
    /// re-subscribing after a bus reconnect is not dead).
    unanswered: std::sync::Mutex<HashSet<String>>,
}

impl HuddleService {
    pub fn new(
        store: Arc<dyn HuddleStore>,
        state: Arc<dyn RoomState>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
        settings: HuddleSettings,
    ) -> Self {
        Self {
            store,
            state,
            chat: None,
            publisher: Publisher::new(bus, subjects),
            settings,
            turns: (0..TURN_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            unanswered: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// The turn of `huddle_id` on this replica.
    fn turn(&self, huddle_id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        huddle_id.hash(&mut h);
        let i = usize::try_from(h.finish() % TURN_STRIPES as u64).unwrap_or(0);
        &self.turns[i]
    }

    /// Checks conversation membership through chat (without it, every user
    /// is taken for a member: tests).
    pub fn with_chat(mut self, chat: Arc<dyn Conversations>) -> Self {
        self.chat = Some(chat);
        self
    }

    pub fn store(&self) -> &Arc<dyn HuddleStore> {
        &self.store
    }

    pub fn state(&self) -> &Arc<dyn RoomState> {
        &self.state
    }

    /// Takes commands, sweeps departures and audits sockets until
    /// `shutdown`; the task ends once commands in flight are done (at most
    /// `drain`).
    pub async fn start(
        self: Arc<Self>,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> std::result::Result<tokio::task::JoinHandle<()>, BusError> {
        let bus = self.publisher.bus();
        let subjects = self.publisher.subjects().clone();
        let consumer =
            service::serve(self.clone(), bus, &subjects, shutdown.clone(), drain).await?;
        Ok(tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut audit = tokio::time::interval(self.settings.audit_every);
            audit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = sweep.tick() => self.sweep().await,
                    _ = audit.tick() => self.audit().await,
                }
            }
            let _ = consumer.await;
        }))
    }

    /// Loads, changes and commits a room, again from a fresh read when
    /// another commit came first. A change that changes nothing writes
    /// nothing.
    async fn mutate<T>(
        &self,
        huddle_id: &str,
        mut change: impl FnMut(&mut Room) -> std::result::Result<T, RoomError>,
    ) -> Result<(Room, T)> {
        for _ in 0..MAX_TRIES {
            let room = self.state.load(huddle_id).await?;
            let mut next = room.clone();
            let out = change(&mut next)?;
            if next == room {
                return Ok((next, out));
            }
            next.rev = room.rev + 1;
            if self.state.commit(huddle_id, &next).await? {
                return Ok((next, out));
            }
        }
        Err(HuddleError::Contended)
    }

    /// An open huddle, or `not_found`.
    async fn open_huddle(&self, huddle_id: &str) -> Result<Huddle> {
        match self.store.get(huddle_id).await? {
            Some(h) if h.ended_at_ms.is_none() => Ok(h),
            _ => Err(ClientError::NotFound.into()),
        }
    }

    /// Whether `user_id` is a member of `conversation_id`: `not_found` for
    /// an unknown conversation.
    async fn is_member(&self, conversation_id: &str, user_id: &str) -> Result<bool> {
        let Some(chat) = &self.chat else {
            return Ok(true);
        };
        match chat.members(conversation_id).await {
            Ok(Some(members)) => Ok(members.iter().any(|m| m == user_id)),
            Ok(None) => Err(ClientError::NotFound.into()),
            Err(err) => {
                tracing::warn!(%err, "conversation members unknown");
                Err(ClientError::Unavailable.into())
            }
        }
    }

    /// Creates a huddle for `created_by` (a member of the conversation) and
    /// tells the conversation.
    pub async fn create(
        &self,
        conversation_id: &str,
        title: Option<String>,
        created_by: &str,
    ) -> Result<Huddle> {
        if !self.is_member(conversation_id, created_by).await? {
            return Err(ClientError::Forbidden.into());
        }
        let huddle = Huddle::new(conversation_id, title, created_by, now_ms());
        self.store.create(&huddle).await?;
        metrics::counter!("quckchat_huddles_total", "event" => "created").increment(1);
        let mut view = huddle.view();
        view["participantCount"] = json!(0);
        self.to_topic(
            &format!("chat:{conversation_id}"),
            "huddle:created",
            &json!({ "huddle": view }),
        )
        .await;
        Ok(huddle)
    }

    async fn on_create(&self, cmd: &Command) -> Result<Reply> {
        let conversation_id = cmd.payload.id("conversationId")?;
        let title = match cmd.payload.opt_str("title")? {
            None => None,
            Some(t) if t.len() > MAX_TITLE_BYTES => {
                return Err(ClientError::invalid(
                    "title",
                    &format!("at most {MAX_TITLE_BYTES} bytes"),
                )
                .into())
            }
            Some(t) => Some(t.to_owned()),
        };
        let huddle = self.create(conversation_id, title, &cmd.user_id).await?;
        let mut view = huddle.view();
        view["participantCount"] = json!(0);
        Ok(json!({ "huddle": view }).into())
    }

    async fn join(&self, cmd: &Command) -> Result<Reply> {
        let huddle = self.open_huddle(&cmd.id).await?;
        if !self
            .is_member(&huddle.conversation_id, &cmd.user_id)
            .await?
        {
            return Err(ClientError::Unauthorized.into());
        }
        let joining = Joining {
            user_id: &cmd.user_id,
            device_id: &cmd.device_id,
            conn_id: &cmd.conn_id,
            node_id: &cmd.node_id,
            audio: cmd.payload.opt_bool("audio")?,
            video: cmd.payload.opt_bool("video")?,
            now_ms: now_ms(),
        };
        let max = self.settings.max_participants;
        let _turn = self.turn(&huddle.id).lock().await;
        let (room, events) = self.mutate(&huddle.id, |r| r.join(&joining, max)).await?;
        self.announce(&huddle, &room, &events).await;
        let mut view = huddle.view();
        view["participantCount"] = json!(room.participants.len());
        Ok(json!({
            "huddle": view,
            "participants": room.views(),
            "iceServers": self.settings.ice.servers_for(&cmd.user_id, chrono::Utc::now().timestamp()),
            "version": room.version,
        })
        .into())
    }

    /// The socket left the channel (or closed): the device stays for the
    /// grace window, so a reconnect shows nothing.
    async fn on_phx_leave(&self, cmd: &Command) -> Result<Reply> {
        let until = now_ms() + grace_ms(&self.settings);
        self.mutate(&cmd.id, |r| {
            Ok(r.away(&cmd.user_id, &cmd.device_id, &cmd.conn_id, until))
        })
        .await?;
        Ok(json!({}).into())
    }

    async fn on_leave(&self, cmd: &Command) -> Result<Reply> {
        let huddle = self.open_huddle(&cmd.id).await?;
        let _turn = self.turn(&huddle.id).lock().await;
        let (room, events) = self
            .mutate(&huddle.id, |r| {
                Ok(r.leave(&cmd.user_id, Some(&cmd.device_id), Some(&cmd.conn_id)))
            })
            .await?;
        self.announce(&huddle, &room, &events).await;
        Ok(json!({}).into())
    }

    async fn on_change(&self, cmd: &Command) -> Result<Reply> {
        let (field, make): (&str, fn(bool) -> Change) = match cmd.event.as_str() {
            "huddle:toggle-audio" => ("enabled", Change::Audio),
            "huddle:toggle-video" => ("enabled", Change::Video),
            "huddle:toggle-screen" => ("enabled", Change::Screen),
            _ => ("raised", Change::Hand),
        };
        let value = cmd
            .payload
            .opt_bool(field)?
            .ok_or_else(|| ClientError::invalid(field, "a boolean"))?;
        let huddle = self.open_huddle(&cmd.id).await?;
        let _turn = self.turn(&huddle.id).lock().await;
        let (room, events) = self
            .mutate(&huddle.id, |r| {
                r.change(&cmd.user_id, &cmd.device_id, make(value))
            })
            .await?;
        self.announce(&huddle, &room, &events).await;
        Ok(json!({ "version": room.version }).into())
    }

    async fn on_participants(&self, cmd: &Command) -> Result<Reply> {
        let room = self.state.load(&cmd.id).await?;
        Ok(json!({ "participants": room.views(), "version": room.version }).into())
    }

    /// The creator's moderation: mute, remove, end.
    async fn on_moderate(&self, cmd: &Command) -> Result<Reply> {
        let huddle = self.open_huddle(&cmd.id).await?;
        if huddle.created_by != cmd.user_id {
            return Err(ClientError::Forbidden.into());
        }
        if cmd.event == "huddle:end" {
            self.end(&huddle.id).await?;
            return Ok(json!({}).into());
        }
        let user = cmd.payload.id("userId")?;
        let device = match cmd.payload.get("deviceId") {
            None => None,
            Some(_) => Some(cmd.payload.id("deviceId")?),
        };
        let room = if cmd.event == "huddle:mute" {
            self.mute(&huddle, user, device).await?
        } else {
            self.remove(&huddle, user, device).await?
        };
        Ok(json!({ "version": room.version }).into())
    }

    /// Turns `user_id`'s audio off (one device, or all).
    pub async fn mute(
        &self,
        huddle: &Huddle,
        user_id: &str,
        device_id: Option<&str>,
    ) -> Result<Room> {
        let _turn = self.turn(&huddle.id).lock().await;
        let (room, events) = self
            .mutate(&huddle.id, |r| Ok(r.mute(user_id, device_id)))
            .await?;
        self.announce(huddle, &room, &events).await;
        Ok(room)
    }

    /// Takes `user_id` out of the huddle (one device, or all) and closes
    /// their channel. The removed sockets get their `participant:left` on
    /// their own connection just before the close (the topic's broadcast
    /// travels another path and could arrive after the close, and be lost).
    pub async fn remove(
        &self,
        huddle: &Huddle,
        user_id: &str,
        device_id: Option<&str>,
    ) -> Result<Room> {
        let _turn = self.turn(&huddle.id).lock().await;
        let (room, events) = self
            .mutate(&huddle.id, |r| Ok(r.leave(user_id, device_id, None)))
            .await?;
        for ev in &events {
            self.to_conn(huddle, &ev.participant, ev.kind.event(), &event_payload(ev))
                .await;
            self.close_conn(huddle, &ev.participant, "removed").await;
        }
        // Then everyone else (the removed socket, closed by then, mostly
        // misses this copy; if it comes first, its version is a duplicate).
        self.announce(huddle, &room, &events).await;
        Ok(room)
    }

    /// Ends a huddle for everyone: each participant's socket gets
    /// `huddle:ended`, then its channel closes (both on the socket's own
    /// path, so in that order). `None` if it had ended (or never existed).
    pub async fn end(&self, huddle_id: &str) -> Result<Option<Huddle>> {
        let Some(huddle) = self.store.end(huddle_id, now_ms()).await? else {
            return Ok(None);
        };
        metrics::counter!("quckchat_huddles_total", "event" => "ended").increment(1);
        let room = self.state.load(huddle_id).await?;
        let ended = json!({ "huddleId": huddle.id });
        for p in &room.participants {
            self.to_conn(&huddle, p, "huddle:ended", &ended).await;
            self.close_conn(&huddle, p, "ended").await;
        }
        self.state.remove(huddle_id).await?;
        self.to_topic(
            &format!("chat:{}", huddle.conversation_id),
            "huddle:ended",
            &ended,
        )
        .await;
        Ok(Some(huddle))
    }

    async fn on_relay(&self, cmd: &Command) -> Result<Reply> {
        let to = cmd.payload.id("to")?;
        let to_device = match cmd.payload.get("toDeviceId") {
            None => None,
            Some(_) => Some(cmd.payload.id("toDeviceId")?),
        };
        let field = if cmd.event == "webrtc:ice-candidate" {
            "candidate"
        } else {
            "sdp"
        };
        let body = match cmd.payload.get(field) {
            Some(v @ (Value::String(_) | Value::Object(_))) => v.clone(),
            Some(_) => return Err(ClientError::invalid(field, "a string or an object").into()),
            None => return Err(ClientError::InvalidPayload(format!("{field} is required")).into()),
        };
        if body.to_string().len() > MAX_RELAY_BYTES {
            return Err(ClientError::PayloadTooLarge {
                limit: MAX_RELAY_BYTES,
            }
            .into());
        }
        let room = self.state.load(&cmd.id).await?;
        if room.find(&cmd.user_id, &cmd.device_id).is_none() {
            return Err(ClientError::Forbidden.into());
        }
        let targets: Vec<&Participant> = room
            .participants
            .iter()
            .filter(|p| p.user_id == to && to_device.is_none_or(|d| p.device_id == d))
            .filter(|p| !p.is(&cmd.user_id, &cmd.device_id))
            .collect();
        if targets.is_empty() {
            return Err(ClientError::NotFound.into());
        }
        let mut out = json!({ "from": cmd.user_id, "fromDeviceId": cmd.device_id });
        out[field] = body;
        let topic = cmd.topic();
        for p in targets {
            if let Err(err) = self
                .publisher
                .to_connection(&p.user_id, &p.conn_id, &topic, &cmd.event, &out)
                .await
            {
                tracing::warn!(%err, "huddle relay not published");
            }
        }
        Ok(json!({}).into())
    }

    async fn on_invite(&self, cmd: &Command) -> Result<Reply> {
        let ids = match cmd.payload.get("userIds") {
            Some(Value::Array(ids)) if !ids.is_empty() && ids.len() <= MAX_INVITEES => ids,
            _ => {
                return Err(ClientError::invalid(
                    "userIds",
                    &format!("an array of 1 to {MAX_INVITEES} user ids"),
                )
                .into())
            }
        };
        let mut invitees = Vec::with_capacity(ids.len());
        for id in ids {
            match id.as_str() {
                Some(id) if quckchat_runtime::ids::valid_id(id) => invitees.push(id.to_owned()),
                _ => return Err(ClientError::invalid("userIds", "an array of user ids").into()),
            }
        }
        let huddle = self.open_huddle(&cmd.id).await?;
        let room = self.state.load(&huddle.id).await?;
        if room.find(&cmd.user_id, &cmd.device_id).is_none() {
            return Err(ClientError::Forbidden.into());
        }
        if let Some(chat) = &self.chat {
            let members = match chat.members(&huddle.conversation_id).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(ClientError::NotFound.into()),
                Err(err) => {
                    tracing::warn!(%err, "conversation members unknown");
                    return Err(ClientError::Unavailable.into());
                }
            };
            if !invitees.iter().all(|u| members.contains(u)) {
                return Err(ClientError::Forbidden.into());
            }
        }
        let invited = json!({
            "huddleId": huddle.id,
            "conversationId": huddle.conversation_id,
            "title": huddle.title,
            "from": cmd.user_id,
        });
        for user in &invitees {
            if let Err(err) = self
                .publisher
                .to_user(user, "webrtc:lobby", "huddle:invited", &invited)
                .await
            {
                tracing::warn!(%err, "huddle invitation not published");
            }
        }
        Ok(json!({ "invited": invitees }).into())
    }

    /// Publishes a commit's events in version order, and the new count to
    /// the conversation when it changed.
    async fn announce(&self, huddle: &Huddle, room: &Room, events: &[RoomEvent]) {
        if events.is_empty() {
            return;
        }
        let topic = huddle.topic();
        for ev in events {
            self.to_topic(&topic, ev.kind.event(), &event_payload(ev))
                .await;
        }
        if events.iter().any(|e| e.kind != EventKind::Updated) {
            self.to_topic(
                &format!("chat:{}", huddle.conversation_id),
                "huddle:updated",
                &json!({ "huddleId": huddle.id, "participantCount": room.participants.len() }),
            )
            .await;
        }
    }

    async fn to_topic(&self, topic: &str, event: &str, payload: &Value) {
        if let Err(err) = self.publisher.to_topic(topic, event, payload, None).await {
            tracing::warn!(%err, event, "huddle event not published");
        }
    }

    async fn to_conn(&self, huddle: &Huddle, p: &Participant, event: &str, payload: &Value) {
        if let Err(err) = self
            .publisher
            .to_connection(&p.user_id, &p.conn_id, &huddle.topic(), event, payload)
            .await
        {
            tracing::warn!(%err, event, "huddle event not published");
        }
    }

    async fn close_conn(&self, huddle: &Huddle, p: &Participant, reason: &str) {
        // `phx_close` on that socket's channel only: the user's other
        // devices stay.
        if let Err(err) = self
            .publisher
            .close_connection_channel(&p.user_id, &p.conn_id, &huddle.topic(), reason)
            .await
        {
            tracing::warn!(%err, "huddle channel close not published");
        }
    }

    /// Departures whose grace ended, on whichever replica gets there first.
    pub async fn sweep(&self) {
        let now = now_ms();
        let due = match self.state.due(now).await {
            Ok(due) => due,
            Err(err) => {
                tracing::warn!(%err, "huddle departures not swept");
                return;
            }
        };
        for huddle_id in due {
            let _turn = self.turn(&huddle_id).lock().await;
            match self.mutate(&huddle_id, |r| Ok(r.depart_due(now))).await {
                Ok((room, events)) if !events.is_empty() => {
                    match self.store.get(&huddle_id).await {
                        Ok(Some(huddle)) => self.announce(&huddle, &room, &events).await,
                        Ok(None) => tracing::warn!(%huddle_id, "departures of an unknown huddle"),
                        Err(err) => tracing::warn!(%err, "departures not announced"),
                    }
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, %huddle_id, "huddle departures not taken"),
            }
        }
    }

    /// Asks each gateway holding participants which of their sockets are
    /// closed; those participants are away (they leave one grace later,
    /// unless they join again). A node with no gateway listening on two
    /// audits in a row is dead: all its participants are away.
    pub async fn audit(&self) {
        let live = match self.state.live().await {
            Ok(live) => live,
            Err(err) => {
                tracing::warn!(%err, "huddle audit: live huddles not read");
                return;
            }
        };
        let mut by_node: HashMap<String, Vec<(String, Participant)>> = HashMap::new();
        for huddle_id in live {
            match self.state.load(&huddle_id).await {
                Ok(room) => {
                    for p in room.participants {
                        if p.away_until_ms.is_none() {
                            by_node
                                .entry(p.node_id.clone())
                                .or_default()
                                .push((huddle_id.clone(), p));
                        }
                    }
                }
                Err(err) => tracing::warn!(%err, "huddle audit: room not read"),
            }
        }
        let subjects = self.publisher.subjects().clone();
        let bus = self.publisher.bus();
        let mut unanswered_now = HashSet::new();
        for (node, held) in by_node {
            let mut closed: Vec<&(String, Participant)> = Vec::new();
            for chunk in held.chunks(MAX_AUDITED_CONNECTIONS) {
                let ask = ConnectionAudit {
                    conn_ids: chunk.iter().map(|(_, p)| p.conn_id.clone()).collect(),
                };
                match bus
                    .request(
                        &subjects.gateway_audit(&node),
                        Vec::new(),
                        ask.encode_to_vec().into(),
                        AUDIT_TIMEOUT,
                    )
                    .await
                {
                    Ok(reply) => match ConnectionAudit::decode(reply.payload.as_ref()) {
                        Ok(answer) => {
                            let gone: HashSet<&str> =
                                answer.conn_ids.iter().map(String::as_str).collect();
                            closed.extend(
                                chunk
                                    .iter()
                                    .filter(|(_, p)| gone.contains(p.conn_id.as_str())),
                            );
                        }
                        Err(err) => tracing::warn!(%err, %node, "huddle audit: undecodable answer"),
                    },
                    Err(BusError::NoResponders(_)) => {
                        unanswered_now.insert(node.clone());
                        if self.was_unanswered(&node) {
                            tracing::warn!(%node, "huddle audit: gateway gone: its participants leave");
                            closed.extend(chunk.iter());
                        }
                    }
                    Err(err) => tracing::warn!(%err, %node, "huddle audit: gateway did not answer"),
                }
            }
            let until = now_ms() + grace_ms(&self.settings);
            let mut per_huddle: HashMap<&str, Vec<&Participant>> = HashMap::new();
            for (huddle_id, p) in closed {
                per_huddle.entry(huddle_id).or_default().push(p);
            }
            for (huddle_id, gone) in per_huddle {
                let result = self
                    .mutate(huddle_id, |r| {
                        for p in &gone {
                            r.away(&p.user_id, &p.device_id, &p.conn_id, until);
                        }
                        Ok(())
                    })
                    .await;
                if let Err(err) = result {
                    tracing::warn!(%err, %huddle_id, "huddle audit: away not recorded");
                }
            }
        }
        *self.unanswered.lock().unwrap_or_else(|e| e.into_inner()) = unanswered_now;
    }

    fn was_unanswered(&self, node: &str) -> bool {
        self.unanswered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(node)
    }
}

/// A participant event's payload: `{participant, version}`, and for a
/// `left` also `{userId, deviceId}`.
fn event_payload(ev: &RoomEvent) -> Value {
    let mut payload = json!({
        "participant": ev.participant.view(),
        "version": ev.version,
    });
    if ev.kind == EventKind::Left {
        payload["userId"] = json!(ev.participant.user_id);
        payload["deviceId"] = json!(ev.participant.device_id);
    }
    payload
}

fn grace_ms(settings: &HuddleSettings) -> i64 {
    i64::try_from(settings.grace.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl Service for HuddleService {
    type Error = HuddleError;

    fn name(&self) -> &'static str {
        routes::HUDDLE
    }

    fn events(&self) -> &'static [&'static str] {
        EVENTS
    }

    async fn handle(&self, cmd: Command) -> Result<Reply> {
        if cmd.id == LOBBY {
            return match cmd.event.as_str() {
                _ if cmd.is_join() || cmd.is_leave() => Ok(json!({}).into()),
                "huddle:create" => self.on_create(&cmd).await,
                other => Err(ClientError::UnknownEvent(other.to_owned()).into()),
            };
        }
        if cmd.is_join() {
            return self.join(&cmd).await;
        }
        if cmd.is_leave() {
            return self.on_phx_leave(&cmd).await;
        }
        match cmd.event.as_str() {
            "huddle:leave" => self.on_leave(&cmd).await,
            "huddle:toggle-audio"
            | "huddle:toggle-video"
            | "huddle:toggle-screen"
            | "huddle:raise-hand" => self.on_change(&cmd).await,
            "huddle:participants" => self.on_participants(&cmd).await,
            "huddle:invite" => self.on_invite(&cmd).await,
            "huddle:mute" | "huddle:remove" | "huddle:end" => self.on_moderate(&cmd).await,
            "webrtc:offer" | "webrtc:answer" | "webrtc:ice-candidate" => self.on_relay(&cmd).await,
            other => Err(ClientError::UnknownEvent(other.to_owned()).into()),
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
