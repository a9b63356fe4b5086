//! What presence does with gateway reports: keep the state, and tell each
//! user's conversations when they (or one of their devices) come and go.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use quckchat_proto::bus::{connection_lifecycle, ConnectionLifecycle, NodeHeartbeat, TopicEvent};
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::ListConversationsRequest;
use quckchat_runtime::bus::{Bus, BusError, Subjects};
use quckchat_runtime::grpc::CallError;
use quckchat_runtime::presence::{entries, meta, OFFLINE_NOTICE};
use quckchat_runtime::routes;
use quckchat_runtime::time::{iso, now_ms};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::config::PresenceTiming;
use crate::state::{Connection, DeviceMeta, Joined, PresenceState};

/// Queue group: each report is handled by one presence replica.
pub const SERVICE: &str = "presence";
/// How often departures and dead nodes are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// How long a user's conversation list is trusted.
const MEMBERSHIP_TTL: Duration = Duration::from_secs(30);

/// Which conversations a user is in (from chat-svc).
#[async_trait]
pub trait Memberships: Send + Sync {
    async fn conversations_of(&self, user_id: &str) -> Result<Arc<Vec<String>>, CallError>;
}

/// Memberships over chat-svc's gRPC API, cached.
pub struct ChatMemberships {
    chat: quckchat_runtime::grpc::Replicas,
    cache: moka::future::Cache<String, Arc<Vec<String>>>,
}

impl ChatMemberships {
    /// Connects lazily to `urls` (chat-svc's replicas, comma-separated, or
    /// the all-in-one server itself), presenting `token` (`GRPC_AUTH_TOKEN`).
    pub fn new(urls: &str, token: &quckchat_runtime::grpc::GrpcToken) -> Result<Self, String> {
        Ok(Self {
            chat: quckchat_runtime::grpc::Replicas::with_defaults(urls, token)?,
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(MEMBERSHIP_TTL)
                .build(),
        })
    }
}

#[async_trait]
impl Memberships for ChatMemberships {
    async fn conversations_of(&self, user_id: &str) -> Result<Arc<Vec<String>>, CallError> {
        if let Some(hit) = self.cache.get(user_id).await {
            return Ok(hit);
        }
        let ids = self
            .chat
            .call(|channel| {
                let request = ListConversationsRequest {
                    user_id: user_id.to_owned(),
                };
                async move {
                    ChatServiceClient::new(channel)
                        .list_conversations(request)
                        .await
                }
            })
            .await
            .map_err(|s| CallError::new(routes::CHAT, &s))?
            .into_inner()
            .conversation_ids;
        let ids = Arc::new(ids);
        self.cache.insert(user_id.to_owned(), ids.clone()).await;
        Ok(ids)
    }
}

pub struct PresenceService {
    state: Arc<dyn PresenceState>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    memberships: Arc<dyn Memberships>,
    timing: PresenceTiming,
    /// Announcements run beside the event loop, [`ANNOUNCE_CONCURRENCY`]
    /// at once, so a slow chat-svc never holds up gateway reports.
    announcing: Arc<tokio::sync::Semaphore>,
    /// Announcements waiting or running: at most [`MAX_PENDING_ANNOUNCEMENTS`]
    /// (past it the event loop waits), drained at shutdown.
    pending: Arc<tokio::sync::Semaphore>,
    announcements: tokio_util::task::TaskTracker,
    /// Nodes are not expired until one TTL after start: heartbeats sent
    /// while this service was down are not a node's death.
    started: std::time::Instant,
}

/// Announcements in flight at once.
const ANNOUNCE_CONCURRENCY: usize = 64;
/// Announcements waiting at most; past it, reports wait for room.
const MAX_PENDING_ANNOUNCEMENTS: usize = 10_000;

fn device_meta(m: &DeviceMeta) -> Value {
    meta(&m.device_id, &m.phx_ref, m.online_at_ms)
}

impl PresenceService {
    pub fn new(
        state: Arc<dyn PresenceState>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
        memberships: Arc<dyn Memberships>,
        timing: PresenceTiming,
    ) -> Self {
        Self {
            state,
            bus,
            subjects,
            memberships,
            timing,
            announcing: Arc::new(tokio::sync::Semaphore::new(ANNOUNCE_CONCURRENCY)),
            pending: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_ANNOUNCEMENTS)),
            announcements: tokio_util::task::TaskTracker::new(),
            started: std::time::Instant::now(),
        }
    }

    /// Tells the user's conversations `events`, beside the event loop
    /// (waits only when [`MAX_PENDING_ANNOUNCEMENTS`] are already queued).
    async fn announce(self: &Arc<Self>, user_id: String, events: Vec<(&'static str, Value)>) {
        let Ok(queued) = self.pending.clone().acquire_owned().await else {
            return;
        };
        let this = self.clone();
        self.announcements.spawn(async move {
            let _queued = queued;
            let Ok(_running) = this.announcing.clone().acquire_owned().await else {
                return;
            };
            this.tell_conversations(&user_id, &events).await;
        });
    }

    pub fn state(&self) -> &Arc<dyn PresenceState> {
        &self.state
    }

    fn grace_ms(&self) -> i64 {
        i64::try_from(self.timing.grace.as_millis()).unwrap_or(i64::MAX)
    }

    /// Subscribes to gateway reports and starts the sweeper; everything stops
    /// with `shutdown`, and the task ends once the announcements queued by
    /// then are sent (at most `drain` later).
    pub async fn start(
        self: Arc<Self>,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> Result<tokio::task::JoinHandle<()>, BusError> {
        let mut lifecycle = self
            .bus
            .subscribe(&self.subjects.connection_lifecycle(), Some(SERVICE))
            .await?;
        let mut heartbeats = self
            .bus
            .subscribe(&self.subjects.node_heartbeat(), Some(SERVICE))
            .await?;
        Ok(tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    Some(msg) = lifecycle.next() => match ConnectionLifecycle::decode(msg.payload.as_ref()) {
                        Ok(ev) => self.clone().on_lifecycle(ev).await,
                        Err(err) => tracing::warn!(%err, "undecodable connection report"),
                    },
                    Some(msg) = heartbeats.next() => match NodeHeartbeat::decode(msg.payload.as_ref()) {
                        Ok(beat) => self.on_heartbeat(beat).await,
                        Err(err) => tracing::warn!(%err, "undecodable node heartbeat"),
                    },
                    _ = sweep.tick() => self.sweep().await,
                }
            }
            self.announcements.close();
            if tokio::time::timeout(drain, self.announcements.wait())
                .await
                .is_err()
            {
                tracing::warn!("presence announcements still running after the drain window");
            }
        }))
    }

    async fn on_lifecycle(self: Arc<Self>, ev: ConnectionLifecycle) {
        let conn = Connection {
            node_id: ev.node_id.clone(),
            conn_id: ev.conn_id.clone(),
            user_id: ev.user_id.clone(),
            device_id: ev.device_id.clone(),
        };
        let now = now_ms();
        if ev.kind == connection_lifecycle::Kind::Closed as i32 {
            if let Err(err) = self.state.disconnect(&conn, now, self.grace_ms()).await {
                tracing::warn!(%err, "connection close not recorded");
            }
            return;
        }
        match self.state.connect(&conn, now).await {
            Ok(Joined::Device {
                meta,
                user_came_online,
            }) => {
                let mut events = Vec::new();
                // A hidden device (past the shown cap) is not announced: one
                // user's thousands of sockets cost one diff per shown device,
                // not one per socket to every other socket.
                if !meta.hidden {
                    let diff = json!({
                        "joins": entries([(conn.user_id.as_str(), vec![device_meta(&meta)])]),
                        "leaves": {},
                    });
                    events.push(("presence_diff", diff));
                }
                if user_came_online {
                    events.push(("user:online", json!({ "userId": conn.user_id })));
                }
                if events.is_empty() {
                    return;
                }
                // Telling conversations needs a gRPC round trip: do not hold
                // up the next report.
                self.announce(conn.user_id, events).await;
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "connection open not recorded"),
        }
    }

    async fn on_heartbeat(&self, beat: NodeHeartbeat) {
        let now = now_ms();
        if beat.leaving {
            tracing::info!(node = %beat.node_id, "gateway left");
            if let Err(err) = self
                .state
                .node_gone(&beat.node_id, now, self.grace_ms())
                .await
            {
                tracing::warn!(%err, "gateway departure not recorded");
            }
            return;
        }
        match self.state.heartbeat(&beat.node_id, now).await {
            // Unknown node with sockets: ask it to report them again.
            Ok(true) if beat.connections > 0 => {
                tracing::info!(node = %beat.node_id, sockets = beat.connections, "gateway unknown: asking for its sockets");
                let subject = self.subjects.gateway_resync(&beat.node_id);
                if let Err(err) = self
                    .bus
                    .publish(&subject, None, Vec::new(), Bytes::new())
                    .await
                {
                    tracing::warn!(%err, "resync request not sent");
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "node heartbeat not recorded"),
        }
    }

    /// Drops dead nodes and announces devices whose grace window ended.
    async fn sweep(self: &Arc<Self>) {
        let now = now_ms();
        let ttl = i64::try_from(self.timing.node_ttl.as_millis()).unwrap_or(i64::MAX);
        if self.started.elapsed() >= self.timing.node_ttl {
            match self.state.expire_nodes(now, ttl).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(nodes = n, "silent gateways dropped"),
                Err(err) => tracing::warn!(%err, "node expiry failed"),
            }
        }
        let departures = match self.state.take_departures(now).await {
            Ok(d) => d,
            Err(err) => {
                tracing::warn!(%err, "departures not taken");
                return;
            }
        };
        for left in departures {
            let mut events = Vec::new();
            if !left.meta.hidden {
                let diff = json!({
                    "joins": {},
                    "leaves": entries([(left.user_id.as_str(), vec![device_meta(&left.meta)])]),
                });
                events.push(("presence_diff", diff));
            }
            if left.user_went_offline {
                metrics::counter!("quckchat_presence_offline_total").increment(1);
                self.notice_offline(&left.user_id).await;
                let at = chrono::DateTime::from_timestamp_millis(now).unwrap_or_default();
                events.push((
                    "user:offline",
                    json!({ "userId": left.user_id, "lastSeenAt": iso(at) }),
                ));
            }
            if !events.is_empty() {
                self.announce(left.user_id, events).await;
            }
        }
    }

    /// Tells other services (signaling) that `user_id` has no device left.
    async fn notice_offline(&self, user_id: &str) {
        let subject = self
            .subjects
            .service_event(routes::PRESENCE, OFFLINE_NOTICE);
        if let Err(err) = self
            .bus
            .publish(&subject, None, Vec::new(), Bytes::from(user_id.to_owned()))
            .await
        {
            tracing::warn!(%err, "offline notice not published");
        }
    }

    /// Publishes `events` on every `chat:<id>` topic of the user.
    async fn tell_conversations(&self, user_id: &str, events: &[(&str, Value)]) {
        let conversations = match self.memberships.conversations_of(user_id).await {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(%err, user_id, "conversations unknown: presence not announced");
                return;
            }
        };
        for conversation_id in conversations.iter() {
            let topic = format!("chat:{conversation_id}");
            let subject = self.subjects.topic(&topic);
            for (event, payload) in events {
                let ev = TopicEvent {
                    topic: topic.clone(),
                    event: (*event).to_owned(),
                    payload: payload.to_string().into_bytes(),
                    exclude_user_id: String::new(),
                    seq: 0,
                };
                if let Err(err) = self
                    .bus
                    .publish(&subject, None, Vec::new(), Bytes::from(ev.encode_to_vec()))
                    .await
                {
                    tracing::warn!(%err, %subject, "presence event not published");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryState;
    use quckchat_runtime::bus::MemoryBus;

    struct NoConversations;

    #[async_trait]
    impl Memberships for NoConversations {
        async fn conversations_of(&self, _user_id: &str) -> Result<Arc<Vec<String>>, CallError> {
            Ok(Arc::new(Vec::new()))
        }
    }

    /// One conversation, answered slowly (a busy chat-svc).
    struct SlowConversations;

    #[async_trait]
    impl Memberships for SlowConversations {
        async fn conversations_of(&self, _user_id: &str) -> Result<Arc<Vec<String>>, CallError> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(Arc::new(vec!["c1".to_owned()]))
        }
    }

    /// A presence service on memory state and an in-process bus (prefix
    /// `qc`), with a 1 s grace and this node TTL.
    fn memory_service(
        memberships: Arc<dyn Memberships>,
        node_ttl_secs: u64,
    ) -> (Arc<PresenceService>, Arc<dyn Bus>, Subjects) {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let subjects = Subjects::new("qc");
        let timing = PresenceTiming {
            grace: Duration::from_secs(1),
            node_ttl: Duration::from_secs(node_ttl_secs),
        };
        let service = Arc::new(PresenceService::new(
            Arc::new(MemoryState::new()),
            bus.clone(),
            subjects.clone(),
            memberships,
            timing,
        ));
        (service, bus, subjects)
    }

    #[tokio::test]
    async fn announcements_queued_at_shutdown_are_sent_before_the_worker_ends() {
        let (service, bus, subjects) = memory_service(Arc::new(SlowConversations), 30);
        let mut topic = bus
            .subscribe(&subjects.topic("chat:c1"), None)
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let worker = service
            .clone()
            .start(stop.clone(), Duration::from_secs(10))
            .await
            .unwrap();
        service
            .clone()
            .on_lifecycle(ConnectionLifecycle {
                kind: connection_lifecycle::Kind::Opened as i32,
                node_id: "gw@1".into(),
                conn_id: "k1".into(),
                user_id: "alice".into(),
                device_id: "phone".into(),
                at_ms: 0,
            })
            .await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), worker)
            .await
            .expect("the worker ended within its drain")
            .unwrap();
        // Already published when the worker ended: no waiting here.
        let msg = tokio::time::timeout(Duration::from_millis(10), topic.next())
            .await
            .expect("the announcement queued before the stop was sent before the worker ended")
            .unwrap();
        let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
        assert_eq!(ev.event, "presence_diff");
    }

    /// One conversation, answered at once.
    struct OneConversation;

    #[async_trait]
    impl Memberships for OneConversation {
        async fn conversations_of(&self, _user_id: &str) -> Result<Arc<Vec<String>>, CallError> {
            Ok(Arc::new(vec!["c1".to_owned()]))
        }
    }

    /// `presence_diff`s published to `chat:c1` after `n` sockets of one user
    /// open, each its own device (a client that names none) and each
    /// device with a second socket. Every socket joined to the conversation
    /// gets each diff: deliveries are this times the sockets.
    async fn diffs_for_sockets_of_one_user(n: usize) -> usize {
        let (service, bus, subjects) = memory_service(Arc::new(OneConversation), 30);
        let mut topic = bus
            .subscribe(&subjects.topic("chat:c1"), None)
            .await
            .unwrap();
        for i in 0..2 * n {
            service
                .clone()
                .on_lifecycle(ConnectionLifecycle {
                    kind: connection_lifecycle::Kind::Opened as i32,
                    node_id: "gw@1".into(),
                    conn_id: format!("k{i}"),
                    user_id: "alice".into(),
                    device_id: format!("dev{}", i % n),
                    at_ms: 0,
                })
                .await;
        }
        service.announcements.close();
        service.announcements.wait().await;
        let mut diffs = 0;
        while let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_millis(50), topic.next()).await
        {
            if TopicEvent::decode(msg.payload.as_ref()).unwrap().event == "presence_diff" {
                diffs += 1;
            }
        }
        diffs
    }

    #[tokio::test]
    async fn many_sockets_of_one_user_announce_at_most_the_shown_devices() {
        use crate::state::MAX_SHOWN_DEVICES;
        assert_eq!(diffs_for_sockets_of_one_user(5).await, 5);
        // 500 devices, 1,000 sockets: without the cap, 500 diffs each
        // delivered to all 1,000 sockets (half a million deliveries).
        let n = 500;
        let diffs = diffs_for_sockets_of_one_user(n).await;
        assert_eq!(diffs, MAX_SHOWN_DEVICES, "diffs for {n} devices");
    }

    #[tokio::test]
    async fn an_unknown_gateway_is_asked_for_its_sockets() {
        let (service, bus, subjects) = memory_service(Arc::new(NoConversations), 3);
        let mut asks = bus
            .subscribe(&subjects.gateway_resync("gw@1"), None)
            .await
            .unwrap();
        let beat = |connections| NodeHeartbeat {
            node_id: "gw@1".into(),
            connections,
            at_ms: 0,
            leaving: false,
        };
        service.on_heartbeat(beat(0)).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), asks.next())
                .await
                .is_err(),
            "a gateway with no sockets has nothing to report"
        );
        service.state.node_gone("gw@1", 0, 0).await.unwrap();
        service.on_heartbeat(beat(3)).await;
        assert!(tokio::time::timeout(Duration::from_secs(1), asks.next())
            .await
            .unwrap()
            .is_some());
        service.on_heartbeat(beat(3)).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), asks.next())
                .await
                .is_err(),
            "a known gateway is not asked again"
        );
    }
}
