//! How a QuckChat service takes client commands: implement [`Service`] (its
//! name, the events it accepts, `handle`) and [`serve`] does the rest —
//! subscribes to `<prefix>.cmd.<name>` in the queue group `<name>` (replicas
//! share the load), bounds the work in flight, validates the topic and the
//! payload's shape, counts each event by outcome, turns the result into the
//! bus reply the gateway hands to the client, and drains at shutdown.
//!
//! docs/services.md walks through adding a service.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use quckchat_proto::bus::{command_reply, ChannelEvent, ClientCommand, CommandReply};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::bus::{respond, Bus, BusError, BusMessage, Subjects};
use crate::errors::ClientError;
use crate::ids::valid_id;
use crate::routes;
use crate::telemetry;

/// Commands handled at once per replica; more wait on the bus.
pub const MAX_IN_FLIGHT: usize = 1024;

/// The join event: its reply decides whether the client is in.
pub const JOIN: &str = "phx_join";
/// A socket left the channel (sent to services whose route asks for it:
/// `notify_leave`).
pub const LEAVE: &str = "phx_leave";

/// A client's join or push, as a service receives it: the topic is one of
/// the service's kinds with a valid id, the payload is a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// `chat`, `webrtc`, `huddle`, … (one of the service's routes).
    pub kind: &'static str,
    /// The topic's id (`[A-Za-z0-9_-]{1,64}`).
    pub id: String,
    pub event: String,
    pub user_id: String,
    pub device_id: String,
    pub conn_id: String,
    /// The gateway node holding the connection.
    pub node_id: String,
    pub payload: Payload,
}

impl Command {
    /// Checks what the gateway sent: the topic must route to `service`.
    pub fn from_bus(service: &str, cmd: ClientCommand) -> Result<Self, ClientError> {
        let route = routes::route(&cmd.topic).map_err(|_| ClientError::InvalidTopic)?;
        if route.service != service {
            return Err(ClientError::InvalidTopic);
        }
        let id = cmd
            .topic
            .split_once(':')
            .map(|(_, id)| id.to_owned())
            .ok_or(ClientError::InvalidTopic)?;
        Ok(Self {
            kind: route.kind,
            id,
            payload: Payload::parse(&cmd.payload)?,
            event: cmd.event,
            user_id: cmd.user_id,
            device_id: cmd.device_id,
            conn_id: cmd.conn_id,
            node_id: cmd.node_id,
        })
    }

    pub fn is_join(&self) -> bool {
        self.event == JOIN
    }

    pub fn is_leave(&self) -> bool {
        self.event == LEAVE
    }

    /// `kind:id`.
    pub fn topic(&self) -> String {
        format!("{}:{}", self.kind, self.id)
    }
}

/// A client payload: a JSON object, read through accessors that all refuse
/// bad input the same way (`invalid payload: <field> must be …`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Payload(pub Map<String, Value>);

impl Payload {
    /// An empty payload or `null` is an empty object; anything else but an
    /// object is refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, ClientError> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(Self(m)),
            Ok(Value::Null) => Ok(Self::default()),
            _ => Err(ClientError::InvalidPayload("expected an object".into())),
        }
    }

    pub fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    /// An optional string (`null` counts as absent).
    pub fn opt_str(&self, field: &str) -> Result<Option<&str>, ClientError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ClientError::invalid(field, "a string")),
        }
    }

    /// A required string.
    pub fn str(&self, field: &str) -> Result<&str, ClientError> {
        self.opt_str(field)?
            .ok_or_else(|| ClientError::InvalidPayload(format!("{field} is required")))
    }

    /// An optional non-negative integer.
    pub fn opt_u64(&self, field: &str) -> Result<Option<u64>, ClientError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| ClientError::invalid(field, "a non-negative integer")),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>, ClientError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ClientError::invalid(field, "true or false")),
        }
    }

    /// A required id (`[A-Za-z0-9_-]{1,64}`).
    pub fn id(&self, field: &str) -> Result<&str, ClientError> {
        let id = self.str(field)?;
        if valid_id(id) {
            Ok(id)
        } else {
            Err(ClientError::invalid(
                field,
                "an id ([A-Za-z0-9_-], 1 to 64)",
            ))
        }
    }
}

/// A successful answer: the reply's response, and channel events the
/// gateway delivers to the client right after it (`presence_state`, a
/// replay).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub response: Response,
    pub followups: Vec<(String, Value)>,
}

/// A reply's response: a JSON value, or JSON already encoded (a body the
/// service encoded once for a broadcast and the reply).
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Json(Value),
    Encoded(Vec<u8>),
}

impl From<Value> for Response {
    fn from(value: Value) -> Self {
        Self::Json(value)
    }
}

impl Response {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            Self::Json(value) => value.to_string().into_bytes(),
            Self::Encoded(bytes) => bytes,
        }
    }
}

impl Reply {
    pub fn new(response: impl Into<Response>) -> Self {
        Self {
            response: response.into(),
            followups: Vec::new(),
        }
    }

    pub fn followed_by(mut self, event: impl Into<String>, payload: Value) -> Self {
        self.followups.push((event.into(), payload));
        self
    }
}

impl From<Value> for Reply {
    fn from(response: Value) -> Self {
        Self::new(response)
    }
}

/// A service that takes client commands.
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// Its own refusals; the client sees their [`ClientError`].
    type Error: Into<ClientError> + Send;

    /// Its name in [`routes`]: the bus subject `<prefix>.cmd.<name>` and the
    /// queue group.
    fn name(&self) -> &'static str;

    /// The events it accepts besides `phx_join` (and `phx_leave`, which
    /// comes only to services whose route asks for it); others are refused
    /// as `unknown event` before [`Service::handle`] sees them.
    fn events(&self) -> &'static [&'static str];

    /// Answers one join or push.
    async fn handle(&self, cmd: Command) -> Result<Reply, Self::Error>;
}

/// Validates `cmd` for `service`, handles it and builds the bus reply. Also
/// what tests call to drive a service without a bus.
pub async fn answer<S: Service + ?Sized>(service: &S, cmd: ClientCommand) -> CommandReply {
    let event = event_label(service, &cmd.event);
    let started = std::time::Instant::now();
    let result = match Command::from_bus(service.name(), cmd) {
        Ok(cmd)
            if !cmd.is_join()
                && !cmd.is_leave()
                && !service.events().contains(&cmd.event.as_str()) =>
        {
            Err(ClientError::UnknownEvent(cmd.event))
        }
        Ok(cmd) => service.handle(cmd).await.map_err(Into::into),
        Err(err) => Err(err),
    };
    metrics::counter!(
        "quckchat_commands_total",
        "service" => service.name(),
        "event" => event,
        "result" => match &result {
            Ok(_) => "ok",
            Err(err) => err.label(),
        },
    )
    .increment(1);
    metrics::histogram!(
        "quckchat_command_seconds",
        "service" => service.name(),
        "event" => event,
    )
    .record(started.elapsed().as_secs_f64());
    encode_reply(result)
}

/// Only known event names become metric labels (static, no allocation):
/// clients choose event names.
fn event_label<S: Service + ?Sized>(service: &S, event: &str) -> &'static str {
    [&JOIN, &LEAVE]
        .into_iter()
        .chain(service.events())
        .find(|known| **known == event)
        .copied()
        .unwrap_or("other")
}

/// The bus reply for a result.
pub fn encode_reply(result: Result<Reply, ClientError>) -> CommandReply {
    match result {
        Ok(reply) => CommandReply {
            status: command_reply::Status::Ok as i32,
            response: reply.response.into_bytes(),
            followups: reply
                .followups
                .into_iter()
                .map(|(event, payload)| ChannelEvent {
                    event,
                    payload: payload.to_string().into_bytes(),
                })
                .collect(),
        },
        Err(err) => CommandReply {
            status: command_reply::Status::Error as i32,
            response: err.response().to_string().into_bytes(),
            followups: Vec::new(),
        },
    }
}

/// Subscribes `service` to its commands and answers them until `shutdown`;
/// the task it returns ends once the commands in flight are answered (at
/// most `drain` after `shutdown`).
pub async fn serve<S: Service>(
    service: Arc<S>,
    bus: Arc<dyn Bus>,
    subjects: &Subjects,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<tokio::task::JoinHandle<()>, BusError> {
    let name = service.name();
    let mut sub = bus.subscribe(&subjects.command(name), Some(name)).await?;
    Ok(tokio::spawn(async move {
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let tasks = TaskTracker::new();
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => break,
                msg = sub.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let (service, bus) = (service.clone(), bus.clone());
            tasks.spawn(async move {
                let _permit = permit;
                handle_message(service.as_ref(), bus.as_ref(), msg).await;
            });
        }
        drop(sub);
        tasks.close();
        if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            tracing::warn!(
                service = name,
                "commands still running after the drain window"
            );
        }
    }))
}

async fn handle_message<S: Service>(service: &S, bus: &dyn Bus, msg: BusMessage) {
    let reply = match ClientCommand::decode(msg.payload.as_ref()) {
        Ok(cmd) => {
            // The command's span, a child of the gateway's (bus headers).
            let event = event_label(service, &cmd.event);
            let span = tracing::info_span!(
                target: telemetry::TRACE,
                "command",
                otel.name = %format_args!("{}.{event}", service.name()),
                otel.kind = "server",
                service = service.name(),
                event,
                outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            telemetry::follow(&span, &msg.headers);
            let reply = answer(service, cmd).instrument(span.clone()).await;
            let ok = reply.status() == command_reply::Status::Ok;
            let outcome = if ok { "ok" } else { "error" };
            span.record("outcome", outcome);
            if !ok {
                span.record("otel.status_code", "ERROR");
            }
            // RUST_LOG=quckchat_runtime::service=debug: one line per command,
            // with its trace id when traces are on.
            span.in_scope(|| {
                tracing::debug!(service = service.name(), event, outcome, "command answered");
            });
            reply
        }
        Err(err) => {
            // Not from a gateway of this version: answer, never leave it hanging.
            tracing::warn!(service = service.name(), %err, "undecodable command");
            encode_reply(Err(ClientError::Internal))
        }
    };
    if let Err(err) = respond(bus, &msg, Bytes::from(reply.encode_to_vec())).await {
        tracing::warn!(service = service.name(), %err, "reply not sent");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::bus::MemoryBus;

    /// Echoes `say` on `chat` topics; refuses `no`; `slow` takes 300 ms.
    #[derive(Default)]
    struct Echo {
        slow_started: tokio::sync::Notify,
    }

    #[derive(Debug)]
    struct Refused;

    impl From<Refused> for ClientError {
        fn from(_: Refused) -> Self {
            ClientError::Forbidden
        }
    }

    #[async_trait]
    impl Service for Echo {
        type Error = Refused;
        fn name(&self) -> &'static str {
            routes::CHAT
        }
        fn events(&self) -> &'static [&'static str] {
            &["say", "no", "slow"]
        }
        async fn handle(&self, cmd: Command) -> Result<Reply, Refused> {
            match cmd.event.as_str() {
                "no" => Err(Refused),
                "slow" => {
                    self.slow_started.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(json!({"slow": true}).into())
                }
                _ => Ok(Reply::new(json!({
                    "id": cmd.id,
                    "user": cmd.user_id,
                    "text": cmd.payload.opt_str("text").map_err(|_| Refused)?,
                }))
                .followed_by("after", json!({"n": 1}))),
            }
        }
    }

    fn command(topic: &str, event: &str, payload: &str) -> ClientCommand {
        ClientCommand {
            conn_id: "k1".into(),
            user_id: "u1".into(),
            device_id: "d1".into(),
            topic: topic.into(),
            event: event.into(),
            payload: payload.as_bytes().to_vec(),
            node_id: "gw1".into(),
        }
    }

    fn response(reply: &CommandReply) -> (bool, Value) {
        (
            reply.status() == command_reply::Status::Ok,
            serde_json::from_slice(&reply.response).unwrap(),
        )
    }

    #[tokio::test]
    async fn answers_validates_and_refuses_with_one_error_style() {
        let ok = answer(
            &Echo::default(),
            command("chat:c1", "say", r#"{"text":"hi"}"#),
        )
        .await;
        assert_eq!(
            response(&ok),
            (true, json!({"id": "c1", "user": "u1", "text": "hi"}))
        );
        assert_eq!(ok.followups.len(), 1);
        assert_eq!(ok.followups[0].event, "after");
        let cases = [
            (
                command("chat:c1", "shout", "{}"),
                json!({"reason": "unknown event", "event": "shout"}),
            ),
            (
                command("chat:c1", "no", "{}"),
                json!({"reason": "forbidden"}),
            ),
            (
                command("huddle:h1", "say", "{}"),
                json!({"reason": "invalid topic"}),
            ),
            (
                command("chat:a.b", "say", "{}"),
                json!({"reason": "invalid topic"}),
            ),
            (
                command("chat:c1", "say", "[1]"),
                json!({"reason": "invalid payload: expected an object"}),
            ),
        ];
        for (cmd, expected) in cases {
            assert_eq!(
                response(&answer(&Echo::default(), cmd).await),
                (false, expected)
            );
        }
    }

    #[test]
    fn payload_accessors_name_the_field() {
        let p = Payload::parse(br#"{"s":"x","n":-1,"b":1,"id":"bad id","nul":null}"#).unwrap();
        assert_eq!(p.opt_str("nul").unwrap(), None);
        assert_eq!(
            p.str("missing").unwrap_err().reason(),
            "invalid payload: missing is required"
        );
        assert_eq!(
            p.opt_str("n").unwrap_err().reason(),
            "invalid payload: n must be a string"
        );
        assert_eq!(
            p.opt_u64("n").unwrap_err().reason(),
            "invalid payload: n must be a non-negative integer"
        );
        assert_eq!(
            p.opt_bool("b").unwrap_err().reason(),
            "invalid payload: b must be true or false"
        );
        assert!(p.id("id").is_err());
        assert_eq!(p.str("s").unwrap(), "x");
        assert_eq!(Payload::parse(b"null").unwrap(), Payload::default());
    }

    #[tokio::test]
    async fn serve_answers_over_the_bus_and_drains_at_shutdown() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let subjects = Subjects::new("kit");
        let stop = CancellationToken::new();
        let echo = Arc::new(Echo::default());
        let consumer = serve(
            echo.clone(),
            bus.clone(),
            &subjects,
            stop.clone(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let ask = |event: &'static str| {
            let bus = bus.clone();
            let subject = subjects.command(routes::CHAT);
            async move {
                let payload = Bytes::from(command("chat:c1", event, "{}").encode_to_vec());
                let msg = bus
                    .request(&subject, Vec::new(), payload, Duration::from_secs(5))
                    .await
                    .unwrap();
                response(&CommandReply::decode(msg.payload.as_ref()).unwrap())
            }
        };
        assert!(ask("say").await.0);
        // An undecodable command still gets an answer.
        let garbage = bus
            .request(
                &subjects.command(routes::CHAT),
                Vec::new(),
                Bytes::from_static(b"\xff\xff"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        let reply = CommandReply::decode(garbage.payload.as_ref()).unwrap();
        assert_eq!(
            response(&reply),
            (false, json!({"reason": "internal error"}))
        );
        // A command in flight at shutdown is answered before the task ends.
        let slow = tokio::spawn(ask("slow"));
        echo.slow_started.notified().await;
        stop.cancel();
        assert_eq!(slow.await.unwrap(), (true, json!({"slow": true})));
        tokio::time::timeout(Duration::from_secs(5), consumer)
            .await
            .expect("the consumer ended after its drain")
            .unwrap();
    }
}
