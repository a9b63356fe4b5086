//! The QuckChat gateway: WebSocket endpoint of the Phoenix Channels protocol
//! (docs/protocol.md#connection to #limits), stateless apart from its sockets.
//!
//! - [`frame`] — the 2.0.0 / 1.0.0 serializers;
//! - [`routing`] — topic kinds → owning service, topic id validation;
//! - [`socket`] — one socket's channels, heartbeats, replies; `limits` its push
//!   budget and malformed-frame count; `rpc` its calls to the services;
//! - [`hub`] — one bus subscription per topic per node, fanned out locally;
//! - [`admission`] — who may open a socket (origin, sockets per address and
//!   per user), decided before the upgrade. The listener's own guards
//!   (header-read timeout, connection cap) are `quckchat_runtime::server`'s,
//!   configured by [`GatewayConfig::connections`].
//!
//! A client push travels: socket → [`socket`] → bus request on
//! `<prefix>.cmd.<service>` → service → reply → `phx_reply`. A broadcast
//! travels: service → `<prefix>.topic.<kind>.<id>` → [`hub`] → every local
//! socket that joined the topic. Losing a gateway loses no data: clients
//! reconnect elsewhere and rejoin.

pub mod admission;
pub mod config;
pub mod frame;
pub mod hub;
mod limits;
pub mod routing;
mod rpc;
pub mod socket;
pub mod ws;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use base64::Engine as _;
use futures::FutureExt as _;
use prost::Message as _;
use quckchat_proto::bus::{
    connection_lifecycle, ConnectionAudit, ConnectionLifecycle, NodeHeartbeat,
};
use quckchat_runtime::auth::JwtVerifier;
use quckchat_runtime::bus::{Bus, BusMessage, Subjects};
use quckchat_runtime::presence::MAX_AUDITED_CONNECTIONS;
use quckchat_runtime::server::ConnMeta;
use quckchat_runtime::time::now_ms;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{GatewayConfig, SocketConfig};
use frame::Vsn;
use socket::{signal, Live, Peer};

/// Subprotocol prefix carrying the token (phoenix ≥ 1.8 `authToken`).
const BEARER_PROTOCOL_PREFIX: &str = "base64url.bearer.phx.";

/// State shared by every socket of this gateway.
pub struct Shared {
    pub(crate) config: GatewayConfig,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) subjects: Subjects,
    pub(crate) hub: hub::Hub,
    pub(crate) shutdown: CancellationToken,
    verifier: JwtVerifier,
    admission: admission::Admission,
    sockets: TaskTracker,
    /// Open sockets, so they can be reported again to presence on request,
    /// swept for idle ones and told to drain.
    live: std::sync::Mutex<HashMap<Arc<str>, Arc<Live>>>,
    /// Zero of [`Shared::clock_ms`].
    epoch: tokio::time::Instant,
}

/// A gateway: build it, mount [`Gateway::router`], and on shutdown await
/// [`Gateway::drained`].
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    pub fn new(config: GatewayConfig, bus: Arc<dyn Bus>, shutdown: CancellationToken) -> Self {
        let subjects = Subjects::new(config.bus.subject_prefix.clone());
        let verifier = JwtVerifier::hs256(&config.jwt_secret);
        let shared = Arc::new(Shared {
            hub: hub::Hub::new(bus.clone(), subjects.clone()),
            admission: admission::Admission::new(config.admission.clone()),
            bus,
            subjects,
            shutdown,
            verifier,
            config,
            sockets: TaskTracker::new(),
            live: std::sync::Mutex::new(HashMap::new()),
            epoch: tokio::time::Instant::now(),
        });
        let gateway = Self { shared };
        gateway.spawn_sweep();
        gateway.spawn_node_heartbeat();
        gateway.spawn_resync_listener();
        gateway
    }

    /// `GET /socket/websocket` (the Phoenix client appends `/websocket`).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/socket/websocket", get(upgrade))
            .with_state(self.shared.clone())
    }

    /// Open sockets on this node.
    pub fn connections(&self) -> usize {
        self.shared.live_count()
    }

    /// Waits until every socket has closed (they close by themselves within
    /// the drain window once shutdown begins), at most `bound`.
    pub async fn drained(&self, bound: Duration) {
        self.shared.sockets.close();
        if tokio::time::timeout(bound, self.shared.sockets.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.connections(),
                "sockets still open after the drain window"
            );
        }
        // Tell presence this node is gone, so whatever it missed is dropped.
        node_heartbeat(&self.shared, true).await;
    }

    /// Answers presence about this node's sockets: reports every open one
    /// again when it asks (it restarted empty, or had given this node up
    /// for dead), and says which of a list are closed (it missed closes).
    fn spawn_resync_listener(&self) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let node = &shared.config.server.node_name;
            let (resync, audit) = (
                shared.subjects.gateway_resync(node),
                shared.subjects.gateway_audit(node),
            );
            let subscribed = tokio::try_join!(
                shared.bus.subscribe(&resync, None),
                shared.bus.subscribe(&audit, None),
            );
            let (mut resyncs, mut audits) = match subscribed {
                Ok(subs) => subs,
                Err(err) => {
                    tracing::warn!(%err, "cannot hear presence resync requests");
                    return;
                }
            };
            loop {
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    request = resyncs.next() => {
                        if request.is_none() {
                            return;
                        }
                        let sockets: Vec<Arc<Live>> = shared.live().values().cloned().collect();
                        tracing::info!(sockets = sockets.len(), "reporting open sockets to presence again");
                        for socket in &sockets {
                            lifecycle(&shared, &socket.peer, connection_lifecycle::Kind::Opened).await;
                        }
                    }
                    request = audits.next() => {
                        let Some(request) = request else { return };
                        answer_audit(&shared, &request).await;
                    }
                }
            }
        });
    }

    /// One task for every socket's timeouts: every quarter of the idle
    /// timeout (at most a second) it tells the sockets silent for the idle
    /// timeout to close, and once shutdown begins it tells every socket to
    /// drain. A socket thus keeps no timer of its own while idle, and an
    /// idle one closes between 1 and 1¼ idle timeouts after its last frame.
    fn spawn_sweep(&self) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let idle_ms =
                u64::try_from(shared.config.socket.idle_timeout.as_millis()).unwrap_or(u64::MAX);
            let period = (shared.config.socket.idle_timeout / 4)
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            let mut every = tokio::time::interval(period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shared.shutdown.cancelled() => break,
                    _ = every.tick() => {}
                }
                let now = shared.clock_ms();
                for socket in shared.live().values() {
                    if socket.idle_ms(now) >= idle_ms {
                        socket.tx.signal(signal::IDLE);
                    }
                }
            }
            // Sockets opened from now on see the shutdown themselves
            // ([`Shared::opened`]).
            for socket in shared.live().values() {
                socket.tx.signal(signal::DRAIN);
            }
        });
    }

    fn spawn_node_heartbeat(&self) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(shared.config.node_heartbeat);
            loop {
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                node_heartbeat(&shared, false).await;
            }
        });
    }
}

/// Tells presence which of the listed connections are not open here: ids
/// enter the live table before their open is reported and leave it before
/// their close is, so an id presence holds and this node lacks is closed.
async fn answer_audit(shared: &Shared, request: &BusMessage) {
    let Some(reply) = request.reply.as_deref() else {
        return;
    };
    let closed = match ConnectionAudit::decode(request.payload.as_ref()) {
        Ok(audit) if audit.conn_ids.len() <= MAX_AUDITED_CONNECTIONS => {
            let live = shared.live();
            audit
                .conn_ids
                .into_iter()
                .filter(|id| !live.contains_key(id.as_str()))
                .collect()
        }
        Ok(audit) => {
            tracing::warn!(
                ids = audit.conn_ids.len(),
                "presence audit too large: not answered"
            );
            return;
        }
        Err(err) => {
            tracing::warn!(%err, "undecodable presence audit");
            return;
        }
    };
    let answer = ConnectionAudit { conn_ids: closed };
    if let Err(err) = shared
        .bus
        .publish(reply, None, Vec::new(), answer.encode_to_vec().into())
        .await
    {
        tracing::debug!(%err, "presence audit not answered");
    }
}

/// Tells presence this node is alive (or, `leaving`, gone).
async fn node_heartbeat(shared: &Shared, leaving: bool) {
    let beat = NodeHeartbeat {
        node_id: shared.config.server.node_name.clone(),
        connections: u32::try_from(shared.live_count()).unwrap_or(u32::MAX),
        at_ms: now_ms(),
        leaving,
    };
    let subject = shared.subjects.node_heartbeat();
    if let Err(err) = shared
        .bus
        .publish(&subject, None, Vec::new(), beat.encode_to_vec().into())
        .await
    {
        tracing::debug!(%err, "node heartbeat not sent");
    }
}

/// Extracts the token from the connect params or the bearer subprotocol.
fn token_from(params: &HashMap<String, String>, headers: &HeaderMap) -> Option<String> {
    if let Some(t) = params.get("token").filter(|t| !t.is_empty()) {
        return Some(t.clone());
    }
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))
        .and_then(|b64| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b64.trim_end_matches('='))
                .ok()
        })
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
    conn: Option<Extension<ConnectInfo<ConnMeta>>>,
    headers: HeaderMap,
    ws: ws::Upgrade,
) -> Response {
    if shared.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server shutting down").into_response();
    }
    if let Err(refused) = shared.admission.check_origin(&headers) {
        return refused.into_response();
    }
    // The peer is known when served by `quckchat_runtime::server`.
    let peer = conn.map(|Extension(ConnectInfo(meta))| meta.peer.ip());
    let mut ticket = match shared.admission.admit_ip(peer, &headers) {
        Ok(ticket) => ticket,
        Err(refused) => return refused.into_response(),
    };
    let Some(vsn) = Vsn::parse(params.get("vsn").map(String::as_str)) else {
        return (
            StatusCode::BAD_REQUEST,
            "unsupported vsn: use 2.0.0 or 1.0.0",
        )
            .into_response();
    };
    let identity = match token_from(&params, &headers).map(|t| shared.verifier.verify(&t)) {
        Some(Ok(identity)) => identity,
        Some(Err(err)) => {
            metrics::counter!("quckchat_gateway_auth_refused_total").increment(1);
            tracing::debug!(%err, "socket refused");
            return StatusCode::FORBIDDEN.into_response();
        }
        None => {
            metrics::counter!("quckchat_gateway_auth_refused_total").increment(1);
            return StatusCode::FORBIDDEN.into_response();
        }
    };
    // User ids name bus subjects and store keys: refuse what is not an id.
    if !routing::valid_id(&identity.user_id) {
        metrics::counter!("quckchat_gateway_auth_refused_total").increment(1);
        tracing::debug!("socket refused: the token's user id is not an id");
        return StatusCode::FORBIDDEN.into_response();
    }
    let user_id: Arc<str> = identity.user_id.into();
    if let Err(refused) = shared.admission.admit_user(&mut ticket, &user_id) {
        return refused.into_response();
    }
    let device_id = identity
        .device_id
        .filter(|d| routing::valid_id(d))
        .or_else(|| {
            params
                .get("deviceId")
                .filter(|d| routing::valid_id(d))
                .cloned()
        })
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let peer = Peer {
        conn_id: uuid::Uuid::new_v4().simple().to_string().into(),
        user_id,
        device_id,
        vsn,
    };
    let max = shared.config.socket.max_frame_bytes;
    let tracker = shared.sockets.clone();
    ws.on_upgrade(
        "phoenix",
        // Frames up to 4× the limit get an error reply; larger ones close
        // the socket (1009).
        max * 4,
        shared.config.socket.read_buffer,
        move |socket| {
            // The socket lives in a task of its own, so the task that did the
            // upgrade ends now instead of carrying hyper's upgrade for the
            // socket's life. The socket's places in the admission counts end
            // with it. (A combinator, not an `async` block: awaiting the
            // socket's future from a block would hold it twice, once
            // captured, once awaited.)
            let task = socket::run(socket, shared, peer).map(move |()| drop(ticket));
            tracker.spawn(task);
        },
    )
}

impl Shared {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Live>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since this gateway started (tokio's clock, so tests can
    /// pause it).
    pub(crate) fn clock_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn live_count(&self) -> usize {
        self.live().len()
    }

    /// A socket opened: known here and reported to presence.
    pub(crate) async fn opened(&self, socket: &Arc<Live>) {
        // The socket's own `Live`, shared: no copy of its ids.
        self.live()
            .insert(socket.peer.conn_id.clone(), socket.clone());
        // Shutdown began before it entered the table: the sweep's last pass
        // may have missed it.
        if self.shutdown.is_cancelled() {
            socket.tx.signal(signal::DRAIN);
        }
        lifecycle(self, &socket.peer, connection_lifecycle::Kind::Opened).await;
    }

    /// A socket closed.
    pub(crate) async fn closed(&self, peer: &Peer) {
        self.live().remove(&peer.conn_id);
        lifecycle(self, peer, connection_lifecycle::Kind::Closed).await;
    }
}

/// Reports a socket opening or closing (presence listens).
async fn lifecycle(shared: &Shared, peer: &Peer, kind: connection_lifecycle::Kind) {
    let event = ConnectionLifecycle {
        kind: kind as i32,
        node_id: shared.config.server.node_name.clone(),
        conn_id: peer.conn_id.to_string(),
        user_id: peer.user_id.to_string(),
        device_id: peer.device_id.clone(),
        at_ms: now_ms(),
    };
    let subject = shared.subjects.connection_lifecycle();
    if let Err(err) = shared
        .bus
        .publish(&subject, None, Vec::new(), event.encode_to_vec().into())
        .await
    {
        tracing::debug!(%err, "connection lifecycle not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_from_param_or_bearer_subprotocol() {
        let mut params = HashMap::new();
        let mut headers = HeaderMap::new();
        assert_eq!(token_from(&params, &headers), None);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("a.b.c");
        headers.insert(
            "sec-websocket-protocol",
            format!("phoenix, {BEARER_PROTOCOL_PREFIX}{b64}")
                .parse()
                .unwrap(),
        );
        assert_eq!(token_from(&params, &headers).as_deref(), Some("a.b.c"));
        params.insert("token".to_owned(), "x.y.z".to_owned());
        assert_eq!(token_from(&params, &headers).as_deref(), Some("x.y.z"));
    }
}
