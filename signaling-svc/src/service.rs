//! `webrtc:lobby`: the events of a call, from the client's push to the
//! state machine ([`crate::calls`]) and out to the parties' sockets.
//!
//! Every call event goes to users through the gateways' per-user subjects
//! (`Publisher::to_user`, `to_connection`, `to_user_except`): a call's
//! events reach a socket only once it joined `webrtc:lobby`. Besides
//! commands, each replica sweeps the shared timers (ring timeout,
//! disconnect grace) and hears presence's "user offline" notices.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prost::Message as _;
use quckchat_proto::bus::{call_push, CallPush};
use quckchat_runtime::bus::{Bus, BusError, Subjects};
use quckchat_runtime::errors::ClientError;
use quckchat_runtime::presence::OFFLINE_NOTICE;
use quckchat_runtime::publish::Publisher;
use quckchat_runtime::push;
use quckchat_runtime::routes;
use quckchat_runtime::service::{self, Command, Reply, Service};
use quckchat_runtime::time::now_ms;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::call::{Call, CallStage, CallType, EndReason};
use crate::calls::{CallTiming, Calls, CallsError, Device, Ender, Initiated, RelayTo};
use crate::chat::Conversations;
use crate::huddles::Huddles;
use crate::ice::IceConfig;
use crate::log::CallLog;
use crate::state::CallState;

/// The one topic of this service.
pub const LOBBY: &str = "webrtc:lobby";
/// Largest SDP, and largest batch of ICE candidates, relayed (bytes of JSON).
pub const MAX_RELAY_BYTES: usize = 64 * 1024;
/// How often each replica looks for due timers.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);

const EVENTS: &[&str] = &[
    "call:initiate",
    "call:answer",
    "call:reject",
    "call:end",
    "call:escalate",
    "webrtc:offer",
    "webrtc:answer",
    "webrtc:ice-candidate",
];

/// A refusal of this service.
#[derive(Debug, thiserror::Error)]
pub enum SignalingError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Calls(#[from] CallsError),
}

impl From<SignalingError> for ClientError {
    fn from(err: SignalingError) -> Self {
        match err {
            SignalingError::Client(e) => e,
            SignalingError::Calls(e) => e.into(),
        }
    }
}

impl From<CallsError> for ClientError {
    fn from(err: CallsError) -> Self {
        match err {
            CallsError::NotFound => ClientError::NotFound,
            CallsError::Forbidden => ClientError::Forbidden,
            CallsError::Busy => ClientError::Busy,
            CallsError::AnsweredElsewhere => ClientError::AnsweredElsewhere,
            CallsError::Ended => ClientError::CallEnded,
            CallsError::State(err) => {
                tracing::warn!(%err, "call state unavailable");
                ClientError::Unavailable
            }
            CallsError::Contended => {
                tracing::warn!("call changed too often at once: gave up");
                ClientError::Unavailable
            }
        }
    }
}

type Result<T> = std::result::Result<T, SignalingError>;

pub struct SignalingService {
    calls: Calls,
    ice: IceConfig,
    publisher: Publisher,
    log: Arc<dyn CallLog>,
    chat: Option<Arc<dyn Conversations>>,
    /// Where `call:escalate` creates huddles (none: it answers
    /// `service unavailable`).
    huddles: Option<Arc<dyn Huddles>>,
    /// Call-log writes and chat messages, beside the replies; awaited at
    /// shutdown.
    background: TaskTracker,
}

fn device(cmd: &Command) -> Device<'_> {
    Device {
        user_id: &cmd.user_id,
        device_id: &cmd.device_id,
        conn_id: &cmd.conn_id,
    }
}

impl SignalingService {
    pub fn new(
        state: Arc<dyn CallState>,
        log: Arc<dyn CallLog>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
        ice: IceConfig,
        timing: CallTiming,
    ) -> Self {
        Self {
            calls: Calls::new(state, timing),
            ice,
            publisher: Publisher::new(bus, subjects),
            log,
            chat: None,
            huddles: None,
            background: TaskTracker::new(),
        }
    }

    /// Checks conversations through chat and posts each call's message there.
    pub fn with_chat(mut self, chat: Arc<dyn Conversations>) -> Self {
        self.chat = Some(chat);
        self
    }

    /// Creates huddles through huddle-svc for `call:escalate`.
    pub fn with_huddles(mut self, huddles: Arc<dyn Huddles>) -> Self {
        self.huddles = Some(huddles);
        self
    }

    pub fn calls(&self) -> &Calls {
        &self.calls
    }

    pub fn log(&self) -> &Arc<dyn CallLog> {
        &self.log
    }

    pub fn ice_servers(&self, user_id: &str) -> Value {
        self.ice
            .servers_for(user_id, chrono::Utc::now().timestamp())
    }

    /// Takes commands, sweeps timers and hears presence until `shutdown`;
    /// the task ends once commands and call-log writes in flight are done
    /// (at most `drain` each).
    pub async fn start(
        self: Arc<Self>,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> std::result::Result<tokio::task::JoinHandle<()>, BusError> {
        let bus = self.publisher.bus();
        let subjects = self.publisher.subjects().clone();
        let mut offline = bus
            .subscribe(
                &subjects.service_event(routes::PRESENCE, OFFLINE_NOTICE),
                Some(routes::SIGNALING),
            )
            .await?;
        let consumer =
            service::serve(self.clone(), bus, &subjects, shutdown.clone(), drain).await?;
        Ok(tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = sweep.tick() => self.sweep().await,
                    msg = offline.next() => match msg {
                        Some(msg) => match std::str::from_utf8(&msg.payload) {
                            Ok(user_id) => self.on_offline(user_id).await,
                            Err(_) => tracing::warn!("undecodable offline notice"),
                        },
                        None => break,
                    },
                }
            }
            let _ = consumer.await;
            self.background.close();
            if tokio::time::timeout(drain, self.background.wait())
                .await
                .is_err()
            {
                tracing::warn!("call log writes still running after the drain window");
            }
        }))
    }

    /// Ends the calls whose timers are due, on whichever replica gets there
    /// first.
    pub async fn sweep(&self) {
        match self.calls.fire_due(now_ms()).await {
            Ok(ended) => {
                for call in ended {
                    self.announce_end(&call).await;
                }
            }
            Err(err) => tracing::warn!(%err, "call timers not swept"),
        }
    }

    async fn on_offline(&self, user_id: &str) {
        if let Err(err) = self.calls.offline(user_id, now_ms()).await {
            tracing::warn!(%err, "offline user's call not updated");
        }
    }

    async fn join(&self, cmd: &Command) -> Result<Reply> {
        if cmd.id != "lobby" {
            return Err(ClientError::InvalidTopic.into());
        }
        let mut reply = json!({ "iceServers": self.ice_servers(&cmd.user_id) });
        if let Some(rejoined) = self.calls.joined(device(cmd)).await? {
            let mut view = rejoined.call.view();
            view["onThisDevice"] = json!(rejoined.on_this_device);
            reply["activeCall"] = view;
        }
        Ok(reply.into())
    }

    async fn leave(&self, cmd: &Command) -> Result<Reply> {
        self.calls.left(device(cmd), now_ms()).await?;
        Ok(json!({}).into())
    }

    async fn initiate(&self, cmd: &Command) -> Result<Reply> {
        let p = &cmd.payload;
        let callee = p.id("calleeId")?;
        if callee == cmd.user_id {
            return Err(ClientError::invalid("calleeId", "another user than the caller").into());
        }
        let call_type = match p.opt_str("callType")? {
            None => CallType::Audio,
            Some(t) => CallType::parse(t)
                .ok_or_else(|| ClientError::invalid("callType", "\"audio\" or \"video\""))?,
        };
        let conversation = match p.get("conversationId") {
            None => None,
            Some(_) => Some(p.id("conversationId")?.to_owned()),
        };
        if let Some(conversation_id) = &conversation {
            self.check_members(conversation_id, &cmd.user_id, callee)
                .await?;
        }
        match self
            .calls
            .initiate(device(cmd), callee, call_type, conversation, now_ms())
            .await?
        {
            Initiated::Ringing(call) => {
                metrics::counter!("quckchat_calls_total", "event" => "initiated").increment(1);
                self.send_user(&call.callee_id, "call:incoming", &call.incoming_event())
                    .await;
                self.hand_to_push(call_push::Kind::Incoming, &call);
                self.record(&call);
                Ok(json!({ "callId": call.id }).into())
            }
            Initiated::Merged(call) => {
                metrics::counter!("quckchat_calls_total", "event" => "merged").increment(1);
                self.announce_answer(&call).await;
                Ok(json!({ "callId": call.id, "merged": true }).into())
            }
        }
    }

    /// Both parties must be members of a conversation the call names.
    async fn check_members(&self, conversation_id: &str, caller: &str, callee: &str) -> Result<()> {
        let Some(chat) = &self.chat else {
            return Ok(());
        };
        match chat.members(conversation_id).await {
            Ok(None) => Err(ClientError::NotFound.into()),
            Ok(Some(members)) => {
                if [caller, callee]
                    .iter()
                    .all(|u| members.iter().any(|m| m == u))
                {
                    Ok(())
                } else {
                    Err(ClientError::Forbidden.into())
                }
            }
            Err(err) => {
                tracing::warn!(%err, "conversation members unknown");
                Err(ClientError::Unavailable.into())
            }
        }
    }

    async fn answer(&self, cmd: &Command) -> Result<Reply> {
        let call_id = cmd.payload.id("callId")?;
        let answered = self.calls.answer(call_id, device(cmd), now_ms()).await?;
        if answered.fresh {
            metrics::counter!("quckchat_calls_total", "event" => "answered").increment(1);
            self.announce_answer(&answered.call).await;
        }
        Ok(json!({ "callId": call_id }).into())
    }

    /// The caller hears who answered; the callee's other devices stop
    /// ringing.
    async fn announce_answer(&self, call: &Call) {
        let answered = json!({
            "callId": call.id,
            "answeredBy": call.callee_id,
            "answeredByDevice": call.callee_device,
        });
        self.send_conn(
            &call.caller_id,
            &call.caller_conn,
            "call:answered",
            &answered,
        )
        .await;
        let elsewhere = json!({ "callId": call.id, "reason": "answered_elsewhere" });
        if let Err(err) = self
            .publisher
            .to_user_except(
                &call.callee_id,
                &call.callee_conn,
                LOBBY,
                "call:ended",
                &elsewhere,
            )
            .await
        {
            tracing::warn!(%err, call_id = %call.id, "answered_elsewhere not published");
        }
        self.hand_to_push_ended(call, "answered");
        self.record(call);
    }

    async fn reject(&self, cmd: &Command) -> Result<Reply> {
        let call_id = cmd.payload.id("callId")?;
        let reason = cmd.payload.opt_str("reason")?.unwrap_or("rejected");
        if reason.len() > 64 {
            return Err(ClientError::invalid("reason", "at most 64 bytes").into());
        }
        if let Some(call) = self.calls.reject(call_id, device(cmd), now_ms()).await? {
            if call.end_reason == Some(EndReason::Rejected) {
                self.send_user(
                    &call.caller_id,
                    "call:rejected",
                    &json!({ "callId": call.id, "reason": reason }),
                )
                .await;
            }
            self.announce_end(&call).await;
        }
        Ok(json!({ "callId": call_id }).into())
    }

    async fn end(&self, cmd: &Command) -> Result<Reply> {
        let call_id = cmd.payload.id("callId")?;
        if let Some(call) = self
            .calls
            .end(call_id, Ender::User(&cmd.user_id), now_ms())
            .await?
        {
            self.announce_end(&call).await;
        }
        Ok(json!({ "callId": call_id }).into())
    }

    /// A party of a connected call turns it into a huddle of the call's
    /// conversation (or `conversationId`, when the call names none): both
    /// parties get `call:escalated {callId, huddleId, conversationId}` on
    /// every device, then the call ends `escalated`. The parties join the
    /// huddle as its first participants and may invite more.
    async fn escalate(&self, cmd: &Command) -> Result<Reply> {
        let call_id = cmd.payload.id("callId")?;
        let requested = match cmd.payload.get("conversationId") {
            None => None,
            Some(_) => Some(cmd.payload.id("conversationId")?.to_owned()),
        };
        let Some(huddles) = &self.huddles else {
            return Err(ClientError::Unavailable.into());
        };
        let call = self
            .calls
            .call(call_id)
            .await?
            .ok_or(ClientError::NotFound)?;
        let side = call.side_of(&cmd.user_id).ok_or(ClientError::Forbidden)?;
        match call.stage {
            CallStage::Ended => return Err(ClientError::CallEnded.into()),
            CallStage::Ringing => {
                return Err(ClientError::invalid("callId", "a connected call").into())
            }
            CallStage::Connected => {}
        }
        if call.conn_of(side) != cmd.conn_id {
            return Err(ClientError::Forbidden.into());
        }
        let conversation_id = call.conversation_id.clone().or(requested).ok_or_else(|| {
            ClientError::InvalidPayload(
                "conversationId is required: the call names no conversation".into(),
            )
        })?;
        self.check_members(&conversation_id, &call.caller_id, &call.callee_id)
            .await?;
        let huddle_id = huddles
            .create(&conversation_id, &cmd.user_id)
            .await
            .map_err(|err| {
                tracing::warn!(%err, call_id, "huddle for an escalated call not created");
                err.client_error()
            })?;
        metrics::counter!("quckchat_calls_total", "event" => "escalated").increment(1);
        let escalated = json!({
            "callId": call.id,
            "huddleId": huddle_id,
            "conversationId": conversation_id,
        });
        for user in [&call.caller_id, &call.callee_id] {
            self.send_user(user, "call:escalated", &escalated).await;
        }
        if let Some(ended) = self
            .calls
            .end(call_id, Ender::System(EndReason::Escalated), now_ms())
            .await?
        {
            self.announce_end(&ended).await;
        }
        Ok(escalated.into())
    }

    /// Ends a call for the backend (`EndCall`): `None` if it had ended.
    pub async fn end_by_system(
        &self,
        call_id: &str,
        reason: EndReason,
    ) -> std::result::Result<Option<Call>, CallsError> {
        let ended = self
            .calls
            .end(call_id, Ender::System(reason), now_ms())
            .await?;
        if let Some(call) = &ended {
            self.announce_end(call).await;
        }
        Ok(ended)
    }

    /// `call:ended` to every device of both parties, then the log, the
    /// conversation's message and push.
    async fn announce_end(&self, call: &Call) {
        let reason = call.end_reason.map_or("failed", EndReason::as_str);
        metrics::counter!("quckchat_calls_ended_total", "reason" => reason).increment(1);
        let event = call.ended_event();
        for user in [&call.caller_id, &call.callee_id] {
            self.send_user(user, "call:ended", &event).await;
        }
        if call.answered_at_ms.is_none() {
            self.hand_to_push_ended(call, reason);
            // Never picked up, and not declined: a missed call for the callee
            // (no answer, the caller gave up, or the caller's device vanished).
            if call.end_reason != Some(EndReason::Rejected) {
                self.hand_to_push(call_push::Kind::Missed, call);
            }
        }
        self.record(call);
        if let (Some(chat), Some(_)) = (&self.chat, &call.conversation_id) {
            let (chat, call) = (chat.clone(), call.clone());
            self.background.spawn(async move {
                if let Err(err) = chat.post_call_message(&call).await {
                    tracing::warn!(%err, call_id = %call.id, "call message not posted");
                }
            });
        }
    }

    async fn relay(&self, cmd: &Command) -> Result<Reply> {
        let call_id = cmd.payload.id("callId")?;
        let field = match cmd.event.as_str() {
            "webrtc:ice-candidate" => {
                if cmd.payload.get("candidates").is_some() {
                    "candidates"
                } else {
                    "candidate"
                }
            }
            _ => "sdp",
        };
        let body = match (field, cmd.payload.get(field)) {
            (_, None) => {
                return Err(ClientError::InvalidPayload(format!("{field} is required")).into())
            }
            ("sdp", Some(Value::String(s))) => Value::String(s.clone()),
            ("sdp", Some(Value::Object(o))) => Value::Object(o.clone()),
            ("sdp", Some(_)) => {
                return Err(ClientError::invalid("sdp", "a string or an object").into())
            }
            ("candidates", Some(Value::Array(a))) => Value::Array(a.clone()),
            ("candidates", Some(_)) => {
                return Err(ClientError::invalid("candidates", "an array").into())
            }
            (_, Some(v @ (Value::Object(_) | Value::String(_)))) => v.clone(),
            (_, Some(_)) => {
                return Err(ClientError::invalid("candidate", "an object or a string").into())
            }
        };
        if body.to_string().len() > MAX_RELAY_BYTES {
            return Err(ClientError::PayloadTooLarge {
                limit: MAX_RELAY_BYTES,
            }
            .into());
        }
        let (call, to) = self.calls.relay_target(call_id, device(cmd)).await?;
        let mut out = json!({
            "callId": call.id,
            "from": cmd.user_id,
            "fromDeviceId": cmd.device_id,
        });
        out[field] = body;
        match to {
            RelayTo::Connection { user_id, conn_id } => {
                self.send_conn(&user_id, &conn_id, &cmd.event, &out).await;
            }
            RelayTo::User(user_id) => self.send_user(&user_id, &cmd.event, &out).await,
            // The peer is reconnecting: it renegotiates when it is back.
            RelayTo::Away => return Ok(json!({ "delivered": false }).into()),
        }
        Ok(json!({}).into())
    }

    async fn send_user(&self, user_id: &str, event: &str, payload: &Value) {
        if let Err(err) = self.publisher.to_user(user_id, LOBBY, event, payload).await {
            tracing::warn!(%err, event, "call event not published");
        }
    }

    async fn send_conn(&self, user_id: &str, conn_id: &str, event: &str, payload: &Value) {
        if let Err(err) = self
            .publisher
            .to_connection(user_id, conn_id, LOBBY, event, payload)
            .await
        {
            tracing::warn!(%err, event, "call event not published");
        }
    }

    /// Writes `call` to the log beside the reply (a failure is logged: the
    /// call goes on).
    fn record(&self, call: &Call) {
        let (log, call) = (self.log.clone(), call.clone());
        self.background.spawn(async move {
            if let Err(err) = log.record(&call).await {
                tracing::warn!(%err, call_id = %call.id, "call not logged");
            }
        });
    }

    fn hand_to_push(&self, kind: call_push::Kind, call: &Call) {
        self.publish_push(kind, call, "");
    }

    fn hand_to_push_ended(&self, call: &Call, reason: &str) {
        self.publish_push(call_push::Kind::Ended, call, reason);
    }

    fn publish_push(&self, kind: call_push::Kind, call: &Call, reason: &str) {
        let ring_ms = i64::try_from(self.calls.timing().ring_timeout.as_millis()).unwrap_or(0);
        let notice = CallPush {
            kind: kind as i32,
            call_id: call.id.clone(),
            caller_id: call.caller_id.clone(),
            callee_id: call.callee_id.clone(),
            call_type: call.call_type.as_str().to_owned(),
            conversation_id: call.conversation_id.clone().unwrap_or_default(),
            created_at_ms: call.created_at_ms,
            ring_expires_at_ms: call.created_at_ms + ring_ms,
            end_reason: if kind == call_push::Kind::Missed {
                call.end_reason
                    .map(EndReason::as_str)
                    .unwrap_or_default()
                    .to_owned()
            } else {
                reason.to_owned()
            },
        };
        let publisher = self.publisher.clone();
        self.background.spawn(async move {
            if let Err(err) = publisher
                .notice(routes::PUSH, push::CALL_NOTICE, notice.encode_to_vec())
                .await
            {
                tracing::warn!(%err, "call push hand-off not published");
            }
        });
    }
}

#[async_trait]
impl Service for SignalingService {
    type Error = SignalingError;

    fn name(&self) -> &'static str {
        routes::SIGNALING
    }

    fn events(&self) -> &'static [&'static str] {
        EVENTS
    }

    async fn handle(&self, cmd: Command) -> Result<Reply> {
        if cmd.is_join() {
            return self.join(&cmd).await;
        }
        if cmd.id != "lobby" {
            return Err(ClientError::InvalidTopic.into());
        }
        if cmd.is_leave() {
            return self.leave(&cmd).await;
        }
        match cmd.event.as_str() {
            "call:initiate" => self.initiate(&cmd).await,
            "call:answer" => self.answer(&cmd).await,
            "call:reject" => self.reject(&cmd).await,
            "call:end" => self.end(&cmd).await,
            "call:escalate" => self.escalate(&cmd).await,
            "webrtc:offer" | "webrtc:answer" | "webrtc:ice-candidate" => self.relay(&cmd).await,
            other => Err(ClientError::UnknownEvent(other.to_owned()).into()),
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
