//! Presence state: which connections each user's devices have, on which
//! gateway node, and which nodes are alive. One trait, two implementations:
//! [`RedisState`] (distributed, shared by every presence replica) and
//! [`MemoryState`] (all-in-one), both passing the [`conformance`] suite.
//!
//! The model:
//! - a **device** of a user is online while it has a connection, and for a
//!   grace window after its last one closes; a connection of the same device
//!   inside the window cancels the leave, so a network blip or a gateway
//!   deploy shows nothing to others;
//! - a **user** is online while any device is;
//! - at most [`MAX_SHOWN_DEVICES`] devices of a user are **shown** at once:
//!   a device coming online when that many are shown is *hidden* (its meta
//!   says so) for as long as it stays online; hidden devices are not
//!   announced in `presence_diff` and only fill `presence_state` up to the
//!   cap. One user's thousands of sockets (each its own device when the
//!   client names none) thus cost linear work, not one diff per socket to
//!   every other socket;
//! - a **node** (gateway) that stops heartbeating for the node TTL is dead:
//!   its connections are dropped and their devices leave at once;
//! - a connection closed before its open was processed (events can be
//!   handled out of order by different replicas) stays closed.
//!
//! Every operation is atomic, so replicas may process events concurrently.

mod memory;
mod redis;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use self::redis::RedisState;
pub use memory::MemoryState;
/// The ephemeral-state kit's error, shared with every other state.
pub use quckchat_runtime::ephemeral::StateError;

/// A connection as gateways report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub node_id: String,
    pub conn_id: String,
    pub user_id: String,
    pub device_id: String,
}

/// Devices of one user shown at once: announced in `presence_diff`, and
/// the most metas a user has in `presence_state`.
pub const MAX_SHOWN_DEVICES: usize = 16;

/// An online device, as Phoenix Presence metas show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMeta {
    pub device_id: String,
    /// Stable while the device stays online (across reconnects in the grace
    /// window), so clients see no change.
    pub phx_ref: String,
    /// Unix milliseconds.
    pub online_at_ms: i64,
    /// Came online while [`MAX_SHOWN_DEVICES`] others were shown: its join
    /// and leave are not announced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
}

/// The metas `presence_state` lists for one user: the shown devices, then
/// hidden ones (earliest online first) up to [`MAX_SHOWN_DEVICES`], in
/// device id order.
pub(crate) fn capped(mut devices: Vec<DeviceMeta>) -> Vec<DeviceMeta> {
    if devices.len() > MAX_SHOWN_DEVICES {
        devices.sort_by(|a, b| {
            (a.hidden, a.online_at_ms, &a.device_id).cmp(&(b.hidden, b.online_at_ms, &b.device_id))
        });
        devices.truncate(MAX_SHOWN_DEVICES);
    }
    devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    devices
}

/// What a connect changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The connection was already closed (its close was processed first).
    Ignored,
    /// Another connection of an online device.
    Nothing,
    /// The device came online; `user_came_online` when it is the user's first.
    Device {
        meta: DeviceMeta,
        user_came_online: bool,
    },
}

/// A device that went offline once its grace window passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub user_id: String,
    pub meta: DeviceMeta,
    /// It was the user's last device.
    pub user_went_offline: bool,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSeen {
    /// The node was unknown (new, or given up for dead): its open
    /// connections must be reported again.
    pub unknown: bool,
    /// Connections held for the node; a gateway reporting another count
    /// has opens or closes this state missed.
    pub connections: usize,
}

/// One user's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPresence {
    pub user_id: String,
    pub devices: Vec<DeviceMeta>,
    /// Unix milliseconds of the last time the user went offline.
    pub last_seen_ms: Option<i64>,
}

impl UserPresence {
    pub fn online(&self) -> bool {
        !self.devices.is_empty()
    }
}

#[async_trait]
pub trait PresenceState: Send + Sync + 'static {
    /// A connection opened at `now_ms`.
    async fn connect(&self, conn: &Connection, now_ms: i64) -> Result<Joined, StateError>;

    /// A connection closed; its device leaves `grace_ms` later unless it
    /// reconnects.
    async fn disconnect(
        &self,
        conn: &Connection,
        now_ms: i64,
        grace_ms: i64,
    ) -> Result<(), StateError>;

    /// A node is alive at `now_ms`: whether it was known, and how many
    /// connections this state holds for it.
    async fn heartbeat(&self, node_id: &str, now_ms: i64) -> Result<NodeSeen, StateError>;

    /// The connections this state holds for a node.
    async fn node_connections(&self, node_id: &str) -> Result<Vec<Connection>, StateError>;

    /// A node is going away: its connections close, devices leave after
    /// `grace_ms`.
    async fn node_gone(&self, node_id: &str, now_ms: i64, grace_ms: i64) -> Result<(), StateError>;

    /// Drops the connections of nodes silent since before `now_ms - ttl_ms`;
    /// their devices leave at once. Returns how many nodes were dropped.
    async fn expire_nodes(&self, now_ms: i64, ttl_ms: i64) -> Result<usize, StateError>;

    /// Devices whose grace window ended by `now_ms`, removed and returned
    /// (each to exactly one caller).
    async fn take_departures(&self, now_ms: i64) -> Result<Vec<Left>, StateError>;

    /// Presence of many users, in the order asked; at most
    /// [`MAX_SHOWN_DEVICES`] devices each (see [`capped`]).
    async fn presence(&self, user_ids: &[String]) -> Result<Vec<UserPresence>, StateError>;

    /// Whether the state answers (readiness).
    async fn ping(&self) -> Result<(), StateError>;

    fn kind(&self) -> &'static str;
}
