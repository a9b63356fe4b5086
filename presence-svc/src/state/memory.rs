//! In-process presence state for the all-in-one server.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    capped, Connection, DeviceMeta, Joined, Left, NodeSeen, PresenceState, StateError,
    UserPresence, MAX_SHOWN_DEVICES,
};

/// How long a closed connection id is remembered (to ignore a late open).
const CLOSED_MEMORY_MS: i64 = 10 * 60 * 1000;

#[derive(Default)]
pub struct MemoryState {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// user → its devices' metas, ordered by device id (a vector: most
    /// users have one or two, and a map's smallest node holds eleven)
    devices: HashMap<String, Vec<DeviceMeta>>,
    /// (user, device) → open connection ids (a vector: nearly always one,
    /// where a set's smallest table holds four)
    conns: HashMap<(String, String), Vec<String>>,
    /// node → its connections
    node_conns: HashMap<String, HashSet<(String, String, String)>>,
    /// node → last heartbeat
    nodes: HashMap<String, i64>,
    /// (user, device) → when it leaves
    pending: HashMap<(String, String), i64>,
    last_seen: HashMap<String, i64>,
    /// closed connection id → when
    closed: HashMap<String, i64>,
}

impl MemoryState {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where `device` is (or would go) among a user's devices.
fn find(devices: &[DeviceMeta], device: &str) -> Result<usize, usize> {
    devices.binary_search_by(|m| m.device_id.as_str().cmp(device))
}

impl Inner {
    fn close(&mut self, node: &str, user: &str, device: &str, conn: &str, now: i64, leave_at: i64) {
        self.closed.insert(conn.to_owned(), now);
        if let Some(set) = self.node_conns.get_mut(node) {
            set.remove(&(user.to_owned(), device.to_owned(), conn.to_owned()));
        }
        let key = (user.to_owned(), device.to_owned());
        let empty = match self.conns.get_mut(&key) {
            Some(conns) => {
                conns.retain(|c| c != conn);
                conns.is_empty()
            }
            None => true,
        };
        if empty {
            self.conns.remove(&key);
            let has_device = self
                .devices
                .get(user)
                .is_some_and(|d| find(d, device).is_ok());
            if has_device {
                let due = self.pending.entry(key).or_insert(leave_at);
                *due = (*due).min(leave_at);
            }
        }
    }

    fn drop_node(&mut self, node: &str, now: i64, leave_at: i64) {
        self.nodes.remove(node);
        for (user, device, conn) in self.node_conns.remove(node).unwrap_or_default() {
            self.close(node, &user, &device, &conn, now, leave_at);
        }
    }
}

#[async_trait]
impl PresenceState for MemoryState {
    async fn connect(&self, c: &Connection, now_ms: i64) -> Result<Joined, StateError> {
        let mut s = self.lock();
        s.closed.retain(|_, at| now_ms - *at < CLOSED_MEMORY_MS);
        if s.closed.contains_key(&c.conn_id) {
            return Ok(Joined::Ignored);
        }
        s.nodes.insert(c.node_id.clone(), now_ms);
        s.node_conns.entry(c.node_id.clone()).or_default().insert((
            c.user_id.clone(),
            c.device_id.clone(),
            c.conn_id.clone(),
        ));
        let key = (c.user_id.clone(), c.device_id.clone());
        let conns = s.conns.entry(key.clone()).or_default();
        if !conns.contains(&c.conn_id) {
            conns.reserve_exact(1);
            conns.push(c.conn_id.clone());
        }
        s.pending.remove(&key);
        if s.devices
            .get(&c.user_id)
            .is_some_and(|d| find(d, &c.device_id).is_ok())
        {
            return Ok(Joined::Nothing);
        }
        let devices = s.devices.entry(c.user_id.clone()).or_default();
        let shown = devices.iter().filter(|m| !m.hidden).count();
        let hidden = shown >= MAX_SHOWN_DEVICES;
        let user_came_online = devices.is_empty();
        let meta = DeviceMeta {
            device_id: c.device_id.clone(),
            phx_ref: c.conn_id.clone(),
            online_at_ms: now_ms,
            hidden,
        };
        let at = find(devices, &c.device_id).unwrap_or_else(|at| at);
        // One more slot, not the four a vector's first growth makes.
        devices.reserve_exact(1);
        devices.insert(at, meta.clone());
        Ok(Joined::Device {
            meta,
            user_came_online,
        })
    }

    async fn disconnect(
        &self,
        c: &Connection,
        now_ms: i64,
        grace_ms: i64,
    ) -> Result<(), StateError> {
        self.lock().close(
            &c.node_id,
            &c.user_id,
            &c.device_id,
            &c.conn_id,
            now_ms,
            now_ms + grace_ms,
        );
        Ok(())
    }

    async fn heartbeat(&self, node_id: &str, now_ms: i64) -> Result<NodeSeen, StateError> {
        let mut s = self.lock();
        let unknown = s.nodes.insert(node_id.to_owned(), now_ms).is_none();
        Ok(NodeSeen {
            unknown,
            connections: s.node_conns.get(node_id).map_or(0, HashSet::len),
        })
    }

    async fn node_connections(&self, node_id: &str) -> Result<Vec<Connection>, StateError> {
        Ok(self
            .lock()
            .node_conns
            .get(node_id)
            .into_iter()
            .flatten()
            .map(|(user, device, conn)| Connection {
                node_id: node_id.to_owned(),
                conn_id: conn.clone(),
                user_id: user.clone(),
                device_id: device.clone(),
            })
            .collect())
    }

    async fn node_gone(&self, node_id: &str, now_ms: i64, grace_ms: i64) -> Result<(), StateError> {
        self.lock().drop_node(node_id, now_ms, now_ms + grace_ms);
        Ok(())
    }

    async fn expire_nodes(&self, now_ms: i64, ttl_ms: i64) -> Result<usize, StateError> {
        let mut s = self.lock();
        let dead: Vec<String> = s
            .nodes
            .iter()
            .filter(|(_, at)| **at < now_ms - ttl_ms)
            .map(|(n, _)| n.clone())
            .collect();
        for node in &dead {
            s.drop_node(node, now_ms, now_ms);
        }
        Ok(dead.len())
    }

    async fn take_departures(&self, now_ms: i64) -> Result<Vec<Left>, StateError> {
        let mut s = self.lock();
        let due: Vec<(String, String)> = s
            .pending
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        let mut left = Vec::new();
        for key in due {
            s.pending.remove(&key);
            if s.conns.get(&key).is_some_and(|c| !c.is_empty()) {
                continue;
            }
            let (user, device) = key;
            let Some(devices) = s.devices.get_mut(&user) else {
                continue;
            };
            let Ok(at) = find(devices, &device) else {
                continue;
            };
            let meta = devices.remove(at);
            let user_went_offline = devices.is_empty();
            if user_went_offline {
                s.devices.remove(&user);
                s.last_seen.insert(user.clone(), now_ms);
            }
            left.push(Left {
                user_id: user,
                meta,
                user_went_offline,
            });
        }
        Ok(left)
    }

    async fn presence(&self, user_ids: &[String]) -> Result<Vec<UserPresence>, StateError> {
        let s = self.lock();
        Ok(user_ids
            .iter()
            .map(|u| UserPresence {
                user_id: u.clone(),
                devices: s
                    .devices
                    .get(u)
                    .map(|d| capped(d.clone()))
                    .unwrap_or_default(),
                last_seen_ms: s.last_seen.get(u).copied(),
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_state_conformance() {
        super::super::conformance::run_all(std::sync::Arc::new(super::MemoryState::new())).await;
    }
}
