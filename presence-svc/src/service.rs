//! What presence does with gateway reports: keep the state, and tell each
//! user's conversations when they (or one of their devices) come and go.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use quckchat_proto::bus::{
    connection_lifecycle, ConnectionAudit, ConnectionLifecycle, NodeHeartbeat, TopicEvent,
};
use quckchat_proto::chat::chat_service_client::ChatServiceClient;
use quckchat_proto::chat::{ListConversationsRequest, ListConversationsResponse};
use quckchat_runtime::bus::{Bus, BusError, Subjects};
use quckchat_runtime::grpc::CallError;
use quckchat_runtime::presence::{
    entries, meta, MAX_AUDITED_CONNECTIONS, MAX_PRESENCE_MEMBERS, OFFLINE_NOTICE,
};
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
/// How long a gateway has to answer one audit request.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a user's conversation list is trusted.
const MEMBERSHIP_TTL: Duration = Duration::from_secs(30);

/// Which conversations hear a user's presence (from chat-svc).
#[async_trait]
pub trait Memberships: Send + Sync {
    /// The user's conversations of at most [`MAX_PRESENCE_MEMBERS`] members:
    /// bigger ones carry no per-member presence on their topic.
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
            .into_inner();
        let ids = Arc::new(presence_conversations(ids));
        self.cache.insert(user_id.to_owned(), ids.clone()).await;
        Ok(ids)
    }
}

/// The listed conversations that carry per-member presence. A chat-svc
/// that gives no member counts (older than the field) lists them all.
fn presence_conversations(listed: ListConversationsResponse) -> Vec<String> {
    if listed.member_counts.len() != listed.conversation_ids.len() {
        return listed.conversation_ids;
    }
    listed
        .conversation_ids
        .into_iter()
        .zip(listed.member_counts)
        .filter(|(_, members)| *members <= MAX_PRESENCE_MEMBERS as u64)
        .map(|(id, _)| id)
        .collect()
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
    started: Instant,
    /// Per node, what this replica knows of its audits.
    audits: std::sync::Mutex<HashMap<String, AuditMark>>,
}

/// When a node was last audited, for how many heartbeats in a row its
/// connection count disagreed with this state's, and whether its last audit
/// left fewer connections here than it reported.
struct AuditMark {
    last: Instant,
    mismatches: u32,
    running: bool,
    short: bool,
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
            started: Instant::now(),
            audits: std::sync::Mutex::new(HashMap::new()),
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

    async fn on_heartbeat(self: &Arc<Self>, beat: NodeHeartbeat) {
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
            Ok(seen) if seen.unknown => {
                if beat.connections > 0 {
                    tracing::info!(node = %beat.node_id, sockets = beat.connections, "gateway unknown: asking for its sockets");
                    self.request_resync(&beat.node_id).await;
                }
            }
            Ok(seen) => {
                let agree = u32::try_from(seen.connections).is_ok_and(|n| n == beat.connections);
                if self.audit_due(&beat.node_id, agree) {
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.audit(&beat.node_id, beat.connections).await;
                        this.audit_mark(&beat.node_id, |m| m.running = false);
                    });
                }
            }
            Err(err) => tracing::warn!(%err, "node heartbeat not recorded"),
        }
    }

    async fn request_resync(&self, node_id: &str) {
        let subject = self.subjects.gateway_resync(node_id);
        if let Err(err) = self
            .bus
            .publish(&subject, None, Vec::new(), Bytes::new())
            .await
        {
            tracing::warn!(%err, "resync request not sent");
        }
    }

    fn audit_mark<T>(&self, node_id: &str, f: impl FnOnce(&mut AuditMark) -> T) -> T {
        let mut audits = self.audits.lock().unwrap_or_else(|e| e.into_inner());
        f(audits
            .entry(node_id.to_owned())
            .or_insert_with(|| AuditMark {
                last: self.started,
                mismatches: 0,
                running: false,
                short: false,
            }))
    }

    /// Whether to audit a node now: its count disagreed with this state's on
    /// two heartbeats in a row (one alone is usually reports in flight), or
    /// it was not audited for [`PresenceTiming::audit_every`] (an open and a
    /// close both missed leave the counts equal); never twice at once, and
    /// at most once per [`PresenceTiming::audit_min_gap`].
    fn audit_due(&self, node_id: &str, counts_agree: bool) -> bool {
        let (every, min_gap) = (self.timing.audit_every(), self.timing.audit_min_gap());
        self.audit_mark(node_id, |m| {
            m.mismatches = if counts_agree { 0 } else { m.mismatches + 1 };
            let since = m.last.elapsed();
            let due = !m.running && since >= min_gap && (m.mismatches >= 2 || since >= every);
            if due {
                m.running = true;
                m.last = Instant::now();
                m.mismatches = 0;
            }
            due
        })
    }

    /// Reconciles this state with what a gateway has open: connections the
    /// gateway says are closed are closed here (their devices leave after
    /// the grace window, as on any close); when fewer remain than the
    /// gateway reported, twice in a row (once is usually opens in flight),
    /// it is asked to report its sockets again: opens were missed. Closes
    /// missed while presence, its Redis or the bus was down are found within
    /// two heartbeats and one audit gap, opens within two audits more.
    async fn audit(&self, node_id: &str, reported: u32) {
        let held = match self.state.node_connections(node_id).await {
            Ok(held) => held,
            Err(err) => {
                tracing::warn!(%err, node = %node_id, "node audit: connections not read");
                return;
            }
        };
        let subject = self.subjects.gateway_audit(node_id);
        let mut closed = 0usize;
        for chunk in held.chunks(MAX_AUDITED_CONNECTIONS) {
            let ask = ConnectionAudit {
                conn_ids: chunk.iter().map(|c| c.conn_id.clone()).collect(),
            };
            let answer = match self
                .bus
                .request(
                    &subject,
                    Vec::new(),
                    ask.encode_to_vec().into(),
                    AUDIT_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    ConnectionAudit::decode(m.payload.as_ref()).map_err(|e| e.to_string())
                }) {
                Ok(answer) => answer,
                Err(err) => {
                    tracing::warn!(%err, node = %node_id, "node audit: the gateway did not answer");
                    return;
                }
            };
            let gone: std::collections::HashSet<&str> =
                answer.conn_ids.iter().map(String::as_str).collect();
            for conn in chunk.iter().filter(|c| gone.contains(c.conn_id.as_str())) {
                match self.state.disconnect(conn, now_ms(), self.grace_ms()).await {
                    Ok(()) => closed += 1,
                    Err(err) => tracing::warn!(%err, "node audit: close not recorded"),
                }
            }
        }
        if closed > 0 {
            metrics::counter!("quckchat_presence_audit_closed_total").increment(closed as u64);
            tracing::warn!(node = %node_id, closed, "node audit: closes presence had missed");
        }
        let short = held.len() - closed < reported as usize;
        if self.audit_mark(node_id, |m| std::mem::replace(&mut m.short, short)) && short {
            tracing::info!(node = %node_id, held = held.len() - closed, reported, "node audit: opens missed, asking for the sockets");
            self.request_resync(node_id).await;
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

    #[test]
    fn conversations_over_the_size_bound_hear_no_presence() {
        let listed = |counts: Vec<u64>| ListConversationsResponse {
            conversation_ids: vec!["small".into(), "edge".into(), "big".into()],
            member_counts: counts,
        };
        let bound = MAX_PRESENCE_MEMBERS as u64;
        assert_eq!(
            presence_conversations(listed(vec![2, bound, bound + 1])),
            vec!["small", "edge"]
        );
        assert_eq!(
            presence_conversations(listed(Vec::new())),
            vec!["small", "edge", "big"],
            "no counts (an older chat-svc): every conversation, as before"
        );
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

    /// A gateway answering audits: every id not in `open` is closed. Counts
    /// the audits it answered.
    async fn fake_gateway(
        bus: &Arc<dyn Bus>,
        subjects: &Subjects,
        open: &'static [&'static str],
    ) -> Arc<std::sync::atomic::AtomicUsize> {
        let mut asks = bus
            .subscribe(&subjects.gateway_audit("gw@1"), None)
            .await
            .unwrap();
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (bus, count) = (bus.clone(), answered.clone());
        tokio::spawn(async move {
            while let Some(ask) = asks.next().await {
                let ids = ConnectionAudit::decode(ask.payload.as_ref())
                    .unwrap()
                    .conn_ids;
                let closed = ConnectionAudit {
                    conn_ids: ids
                        .into_iter()
                        .filter(|id| !open.contains(&id.as_str()))
                        .collect(),
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                bus.publish(
                    &ask.reply.unwrap(),
                    None,
                    Vec::new(),
                    closed.encode_to_vec().into(),
                )
                .await
                .unwrap();
            }
        });
        answered
    }

    async fn open(service: &Arc<PresenceService>, conn_id: &str, user_id: &str) {
        service
            .clone()
            .on_lifecycle(ConnectionLifecycle {
                kind: connection_lifecycle::Kind::Opened as i32,
                node_id: "gw@1".into(),
                conn_id: conn_id.into(),
                user_id: user_id.into(),
                device_id: "phone".into(),
                at_ms: 0,
            })
            .await;
    }

    fn beat(connections: u32) -> NodeHeartbeat {
        NodeHeartbeat {
            node_id: "gw@1".into(),
            connections,
            at_ms: 0,
            leaving: false,
        }
    }

    async fn held(service: &PresenceService) -> Vec<String> {
        let mut ids: Vec<String> = service
            .state
            .node_connections("gw@1")
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.conn_id)
            .collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn closes_presence_missed_are_found_by_auditing_the_gateway() {
        // Node TTL 3 s: audits at most every second.
        let (service, bus, subjects) = memory_service(Arc::new(NoConversations), 3);
        let answered = fake_gateway(&bus, &subjects, &["k1"]).await;
        open(&service, "k1", "alice").await;
        open(&service, "k2", "bob").await; // closed while presence was down
        service.on_heartbeat(beat(1)).await;
        service.on_heartbeat(beat(1)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            answered.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no audit in the first audit gap after start"
        );
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        service.on_heartbeat(beat(1)).await;
        assert_eq!(
            held(&service).await,
            ["k1", "k2"],
            "one disagreement is not enough"
        );
        service.on_heartbeat(beat(1)).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        while held(&service).await != ["k1"] {
            assert!(
                Instant::now() < deadline,
                "k2 still held: {:?}",
                held(&service).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // bob's device leaves after the grace window, as on any close.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let left = service.state.take_departures(now_ms()).await.unwrap();
        assert_eq!(
            left.iter().map(|l| l.user_id.as_str()).collect::<Vec<_>>(),
            ["bob"]
        );
    }

    #[tokio::test]
    async fn opens_presence_missed_are_asked_for_after_two_short_audits() {
        let (service, bus, subjects) = memory_service(Arc::new(NoConversations), 3);
        let answered = fake_gateway(&bus, &subjects, &["k1", "k2"]).await;
        let mut resyncs = bus
            .subscribe(&subjects.gateway_resync("gw@1"), None)
            .await
            .unwrap();
        open(&service, "k1", "alice").await; // k2's open was missed
        service.on_heartbeat(beat(2)).await;
        for audit in 1..=2 {
            tokio::time::sleep(Duration::from_millis(1_050)).await;
            service.on_heartbeat(beat(2)).await;
            service.on_heartbeat(beat(2)).await;
            let deadline = Instant::now() + Duration::from_secs(2);
            while answered.load(std::sync::atomic::Ordering::SeqCst) < audit {
                assert!(Instant::now() < deadline, "audit {audit} not asked");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let resync = tokio::time::timeout(Duration::from_millis(200), resyncs.next()).await;
            assert_eq!(resync.is_ok(), audit == 2, "resync after audit {audit}");
        }
        assert_eq!(held(&service).await, ["k1"], "nothing closed");
    }
}
