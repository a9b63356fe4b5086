//! In-process presence state for the all-in-one server.
//!
//! Laid out for many idle connections (one user, one device, one socket
//! each): every id is stored once, a device's connections live in its own
//! entry, and the only per-connection hash table is the one keyed by user.
//! About 240 bytes a connection where separate tables per relation took
//! about 640.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

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

/// The model's relations, as the Redis keys name them, and where each is:
/// - devices and their metas: `users`;
/// - a device's open connection ids: [`Device::conns`];
/// - a node's connections, `(user, device, conn)`: each one in the entry
///   of its device, with its node, and found by a scan; the rare one held
///   for a second node lives in `strays`. The count per node is kept, as
///   `heartbeat` answers it on every beat;
/// - a device waiting out its grace window: `pending` (only then: such a
///   device is exactly one that is online with no connection).
#[derive(Default)]
struct Inner {
    /// user → its online devices, ordered by device id. A boxed slice, not
    /// a vector: most users have one or two devices, and a slice keeps no
    /// spare room nor a capacity field.
    users: HashMap<Box<str>, Box<[Device]>>,
    /// node → last heartbeat and how many connections are held for it
    nodes: HashMap<Arc<str>, Node>,
    /// (user, device) → when it leaves
    pending: HashMap<(Box<str>, Box<str>), i64>,
    last_seen: HashMap<Box<str>, i64>,
    /// closed connection id → when
    closed: HashMap<Arc<str>, i64>,
    /// The same, in the order closed: what [`Inner::forget_closed`] drops
    /// from the front, so that an open costs no scan of every closed id.
    closed_order: VecDeque<(Arc<str>, i64)>,
    /// Connections held for a node that their device's entry does not name:
    /// one opened on a second node (an id reported twice), or left on its
    /// node when closed as if on another. Gateways never do that; kept so
    /// counts and listings stay what they would be. Normally empty, so it
    /// costs nothing.
    strays: HashSet<Stray>,
}

/// (node, user, device, conn)
type Stray = (Arc<str>, Box<str>, Box<str>, Arc<str>);

struct Device {
    id: Box<str>,
    /// The connection that brought the device online (its meta's
    /// `phx_ref`): the same allocation as that connection's id in `conns`
    /// while it is open.
    phx_ref: Arc<str>,
    online_at_ms: i64,
    /// Came online while [`MAX_SHOWN_DEVICES`] others were shown.
    hidden: bool,
    /// Open connections; empty while the device waits out its grace window.
    conns: Box<[Open]>,
}

/// An open connection of a device, and the node holding it.
struct Open {
    id: Arc<str>,
    /// Shared with the key in [`Inner::nodes`]: one allocation per node.
    node: Arc<str>,
}

struct Node {
    last_heartbeat_ms: i64,
    /// Connections held for the node, in device entries and strays.
    conns: usize,
}

impl Device {
    fn meta(&self) -> DeviceMeta {
        DeviceMeta {
            device_id: self.id.to_string(),
            phx_ref: self.phx_ref.to_string(),
            online_at_ms: self.online_at_ms,
            hidden: self.hidden,
        }
    }
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
fn find(devices: &[Device], device: &str) -> Result<usize, usize> {
    devices.binary_search_by(|d| (*d.id).cmp(device))
}

/// Inserts into a boxed slice, which is reallocated to fit exactly (a
/// vector's first growth makes room for four).
fn insert_at<T>(items: &mut Box<[T]>, at: usize, item: T) {
    let mut v = std::mem::take(items).into_vec();
    v.reserve_exact(1);
    v.insert(at, item);
    *items = v.into_boxed_slice();
}

/// Removes from a boxed slice, which shrinks to fit.
fn remove_at<T>(items: &mut Box<[T]>, at: usize) -> T {
    let mut v = std::mem::take(items).into_vec();
    let item = v.remove(at);
    *items = v.into_boxed_slice();
    item
}

fn stray(node: &str, user: &str, device: &str, conn: &str) -> Stray {
    (node.into(), user.into(), device.into(), conn.into())
}

/// What a connect did to the connections held for its node.
enum Held {
    /// The device's entry now names the connection, on this node.
    Listed,
    /// The device's entry names it on another node: this node's hold is a
    /// stray.
    Elsewhere(Arc<str>),
    /// Already held for this node.
    Already,
}

impl Inner {
    /// Records a heartbeat (or a connection's) from `node`: its shared id,
    /// and whether it was unknown.
    fn node_seen(&mut self, node: &str, now: i64) -> (Arc<str>, bool) {
        if let Some((key, _)) = self.nodes.get_key_value(node) {
            let key = key.clone();
            if let Some(seen) = self.nodes.get_mut(node) {
                seen.last_heartbeat_ms = now;
            }
            return (key, false);
        }
        let key: Arc<str> = node.into();
        self.nodes.insert(
            key.clone(),
            Node {
                last_heartbeat_ms: now,
                conns: 0,
            },
        );
        (key, true)
    }

    fn count_up(&mut self, node: &str) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.conns += 1;
        }
    }

    /// A dropped node has no count left to lower.
    fn count_down(&mut self, node: &str) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.conns = n.conns.saturating_sub(1);
        }
    }

    /// Every connection held, for whichever node: (node, user, device, conn).
    fn held(&self) -> impl Iterator<Item = (&str, &str, &str, &Arc<str>)> + '_ {
        self.users
            .iter()
            .flat_map(|(user, devices)| {
                devices.iter().flat_map(move |d| {
                    d.conns
                        .iter()
                        .map(move |o| (&*o.node, &**user, &*d.id, &o.id))
                })
            })
            .chain(
                self.strays
                    .iter()
                    .map(|(node, user, device, conn)| (&**node, &**user, &**device, conn)),
            )
    }

    fn close(&mut self, node: &str, user: &str, device: &str, conn: &str, now: i64, leave_at: i64) {
        // The connection leaves its device's entry, whichever node that
        // names; the device then waits out its grace window if it was the
        // last.
        let mut listed = None;
        let mut idle = false;
        if let Some(devices) = self.users.get_mut(user) {
            if let Ok(at) = find(devices, device) {
                let d = &mut devices[at];
                if let Some(i) = d.conns.iter().position(|o| *o.id == *conn) {
                    listed = Some(remove_at(&mut d.conns, i));
                }
                idle = d.conns.is_empty();
            }
        }
        let id = listed
            .as_ref()
            .map_or_else(|| Arc::from(conn), |o| o.id.clone());
        self.closed.insert(id.clone(), now);
        self.closed_order.push_back((id.clone(), now));
        match listed {
            Some(o) if *o.node == *node => self.count_down(node),
            listed => {
                if let Some(o) = listed {
                    // Closed as if on another node: its own node still
                    // holds it.
                    self.strays.insert((o.node, user.into(), device.into(), id));
                }
                if !self.strays.is_empty() && self.strays.remove(&stray(node, user, device, conn)) {
                    self.count_down(node);
                }
            }
        }
        if idle {
            let due = self
                .pending
                .entry((user.into(), device.into()))
                .or_insert(leave_at);
            *due = (*due).min(leave_at);
        }
    }

    /// Forgets the ids closed [`CLOSED_MEMORY_MS`] ago or more, oldest
    /// first; an id closed again since keeps its later time.
    fn forget_closed(&mut self, now: i64) {
        while let Some((id, at)) = self.closed_order.front() {
            if now - *at < CLOSED_MEMORY_MS {
                break;
            }
            if self.closed.get(id) == Some(at) {
                self.closed.remove(id);
            }
            self.closed_order.pop_front();
        }
    }

    fn drop_node(&mut self, node: &str, now: i64, leave_at: i64) {
        if self.nodes.remove(node).is_none() {
            // Nothing is held for a node not known: a connection makes its
            // node known, and dropping a node drops what it holds.
            return;
        }
        let gone: Vec<(Box<str>, Box<str>, Arc<str>)> = self
            .held()
            .filter(|(n, ..)| *n == node)
            .map(|(_, user, device, conn)| (user.into(), device.into(), conn.clone()))
            .collect();
        for (user, device, conn) in gone {
            self.close(node, &user, &device, &conn, now, leave_at);
        }
    }
}

#[async_trait]
impl PresenceState for MemoryState {
    async fn connect(&self, c: &Connection, now_ms: i64) -> Result<Joined, StateError> {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.forget_closed(now_ms);
        if s.closed.contains_key(c.conn_id.as_str()) {
            return Ok(Joined::Ignored);
        }
        let (user, device, conn) = (c.user_id.as_str(), c.device_id.as_str(), c.conn_id.as_str());
        let (node, _) = s.node_seen(&c.node_id, now_ms);
        let devices = match s.users.get_mut(user) {
            Some(devices) => devices,
            None => s.users.entry(user.into()).or_default(),
        };
        let mut idle = false;
        let (held, joined) = match find(devices, device) {
            Ok(at) => {
                let d = &mut devices[at];
                let held = match d.conns.iter().find(|o| *o.id == *conn) {
                    Some(o) if o.node == node => Held::Already,
                    Some(o) => Held::Elsewhere(o.id.clone()),
                    None => {
                        idle = d.conns.is_empty();
                        let len = d.conns.len();
                        insert_at(
                            &mut d.conns,
                            len,
                            Open {
                                id: conn.into(),
                                node: node.clone(),
                            },
                        );
                        Held::Listed
                    }
                };
                (held, Joined::Nothing)
            }
            Err(at) => {
                let shown = devices.iter().filter(|d| !d.hidden).count();
                let hidden = shown >= MAX_SHOWN_DEVICES;
                let user_came_online = devices.is_empty();
                let id: Arc<str> = conn.into();
                let d = Device {
                    id: device.into(),
                    phx_ref: id.clone(),
                    online_at_ms: now_ms,
                    hidden,
                    conns: Box::new([Open {
                        id,
                        node: node.clone(),
                    }]),
                };
                let meta = d.meta();
                insert_at(devices, at, d);
                (
                    Held::Listed,
                    Joined::Device {
                        meta,
                        user_came_online,
                    },
                )
            }
        };
        match held {
            Held::Already => {}
            Held::Listed => {
                // A stray hold of the same connection on this node is now
                // the listed one: moved, not counted twice.
                let moved =
                    !s.strays.is_empty() && s.strays.remove(&stray(&node, user, device, conn));
                if !moved {
                    s.count_up(&node);
                }
            }
            Held::Elsewhere(id) => {
                if s.strays
                    .insert((node.clone(), user.into(), device.into(), id))
                {
                    s.count_up(&node);
                }
            }
        }
        if idle {
            // Its first connection again inside the grace window: it stays.
            s.pending.remove(&(Box::from(user), Box::from(device)));
        }
        Ok(joined)
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
        let (_, unknown) = s.node_seen(node_id, now_ms);
        Ok(NodeSeen {
            unknown,
            connections: s.nodes.get(node_id).map_or(0, |n| n.conns),
        })
    }

    async fn node_connections(&self, node_id: &str) -> Result<Vec<Connection>, StateError> {
        Ok(self
            .lock()
            .held()
            .filter(|(node, ..)| *node == node_id)
            .map(|(_, user, device, conn)| Connection {
                node_id: node_id.to_owned(),
                conn_id: conn.to_string(),
                user_id: user.to_owned(),
                device_id: device.to_owned(),
            })
            .collect())
    }

    async fn node_gone(&self, node_id: &str, now_ms: i64, grace_ms: i64) -> Result<(), StateError> {
        self.lock().drop_node(node_id, now_ms, now_ms + grace_ms);
        Ok(())
    }

    async fn expire_nodes(&self, now_ms: i64, ttl_ms: i64) -> Result<usize, StateError> {
        let mut s = self.lock();
        let dead: Vec<Arc<str>> = s
            .nodes
            .iter()
            .filter(|(_, n)| n.last_heartbeat_ms < now_ms - ttl_ms)
            .map(|(node, _)| node.clone())
            .collect();
        for node in &dead {
            s.drop_node(node, now_ms, now_ms);
        }
        Ok(dead.len())
    }

    async fn take_departures(&self, now_ms: i64) -> Result<Vec<Left>, StateError> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let due: Vec<(Box<str>, Box<str>)> = s
            .pending
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        let mut left = Vec::new();
        for key in due {
            s.pending.remove(&key);
            let (user, device) = key;
            let Some(devices) = s.users.get_mut(&*user) else {
                continue;
            };
            let Ok(at) = find(devices, &device) else {
                continue;
            };
            if !devices[at].conns.is_empty() {
                continue;
            }
            let meta = remove_at(devices, at).meta();
            let user_went_offline = devices.is_empty();
            if user_went_offline {
                if let Some((user, _)) = s.users.remove_entry(&*user) {
                    s.last_seen.insert(user, now_ms);
                }
            }
            left.push(Left {
                user_id: user.into_string(),
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
                    .users
                    .get(u.as_str())
                    .map(|d| capped(d.iter().map(Device::meta).collect()))
                    .unwrap_or_default(),
                last_seen_ms: s.last_seen.get(u.as_str()).copied(),
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
    use super::*;

    #[tokio::test]
    async fn memory_state_conformance() {
        super::super::conformance::run_all(std::sync::Arc::new(super::MemoryState::new())).await;
    }

    fn conn(node: &str, i: usize) -> Connection {
        Connection {
            node_id: node.into(),
            conn_id: format!("k{i:031}"),
            user_id: format!("u{i:011}"),
            device_id: format!("d{i:031}"),
        }
    }

    /// A closed id is remembered ten minutes from its last close: an open
    /// of it is ignored until then, also when it was closed once before.
    #[tokio::test]
    async fn a_closed_id_is_remembered_from_its_last_close() {
        let s = MemoryState::new();
        let (a, b) = (conn("gw@1", 1), conn("gw@1", 2));
        s.connect(&a, 0).await.unwrap();
        s.connect(&b, 0).await.unwrap();
        s.disconnect(&a, 1_000, 0).await.unwrap();
        s.disconnect(&b, 2_000, 0).await.unwrap();
        // `a` closed again (a gateway's resync after a missed close).
        s.disconnect(&a, 300_000, 0).await.unwrap();
        let later = 2_000 + CLOSED_MEMORY_MS;
        // Each device waits out its grace (none was taken): an open counts
        // as another connection of it, unless ignored.
        let opened = |j: Joined| !matches!(j, Joined::Ignored);
        assert!(opened(s.connect(&b, later).await.unwrap()));
        assert!(!opened(s.connect(&a, later).await.unwrap()));
        assert!(opened(
            s.connect(&a, 300_000 + CLOSED_MEMORY_MS).await.unwrap()
        ));
        let inner = s.lock();
        assert!(inner.closed.is_empty() && inner.closed_order.is_empty());
    }

    /// Many one-socket users come and go: nothing of them is kept but what
    /// is meant to be (last seen; closed ids, for ten minutes), and while
    /// they are online each connection id is stored once.
    #[tokio::test]
    async fn ten_thousand_users_leave_nothing_behind() {
        const N: usize = 10_000;
        let s = MemoryState::new();
        let conns: Vec<Connection> = (0..N).map(|i| conn("gw@1", i)).collect();
        for c in &conns {
            assert!(matches!(
                s.connect(c, 1_000).await.unwrap(),
                Joined::Device {
                    user_came_online: true,
                    ..
                }
            ));
        }
        {
            let inner = s.lock();
            assert_eq!(inner.users.len(), N);
            assert!(inner.users.values().all(|devices| {
                let [d] = &devices[..] else { return false };
                d.conns.len() == 1 && Arc::ptr_eq(&d.phx_ref, &d.conns[0].id)
            }));
            assert!(inner.pending.is_empty() && inner.strays.is_empty());
        }
        assert_eq!(s.heartbeat("gw@1", 1_500).await.unwrap().connections, N);
        assert_eq!(s.node_connections("gw@1").await.unwrap().len(), N);

        for c in &conns {
            s.disconnect(c, 2_000, 5_000).await.unwrap();
        }
        assert_eq!(s.lock().pending.len(), N, "each device waits out its grace");
        let left = s.take_departures(7_000).await.unwrap();
        assert_eq!(left.len(), N);
        assert!(left.iter().all(|l| l.user_went_offline));

        {
            let inner = s.lock();
            assert_eq!(inner.users.len(), 0);
            assert_eq!(inner.pending.len(), 0);
            assert_eq!(inner.strays.len(), 0);
            assert_eq!(inner.nodes.len(), 1, "the node stays known");
            assert_eq!(inner.nodes["gw@1"].conns, 0);
            assert_eq!(inner.last_seen.len(), N, "last seen is kept");
            assert_eq!(inner.closed.len(), N, "closed ids, for ten minutes");
        }
        assert_eq!(
            s.heartbeat("gw@1", 8_000).await.unwrap(),
            NodeSeen {
                unknown: false,
                connections: 0
            }
        );
        assert!(s.node_connections("gw@1").await.unwrap().is_empty());
        s.node_gone("gw@1", 9_000, 0).await.unwrap();
        // Any open ten minutes later forgets the closed ids.
        let late = conn("gw@2", N);
        s.connect(&late, 2_000 + CLOSED_MEMORY_MS).await.unwrap();
        let inner = s.lock();
        assert_eq!(inner.closed.len(), 0);
        assert_eq!(inner.closed_order.len(), 0);
        assert_eq!(inner.users.len(), 1);
        assert_eq!(inner.nodes.len(), 1);
        assert!(inner.nodes.contains_key("gw@2"));
    }

    /// A connection id reported on two nodes (no gateway does that) is held
    /// for both, each until closed on that node or the node is dropped.
    #[tokio::test]
    async fn a_connection_reported_on_two_nodes_is_held_for_both() {
        let s = MemoryState::new();
        let a = conn("a", 1);
        let b = Connection {
            node_id: "b".into(),
            ..a.clone()
        };
        assert!(matches!(
            s.connect(&a, 1_000).await.unwrap(),
            Joined::Device { .. }
        ));
        assert_eq!(s.connect(&b, 1_000).await.unwrap(), Joined::Nothing);
        for node in ["a", "b"] {
            assert_eq!(s.heartbeat(node, 1_100).await.unwrap().connections, 1);
            assert_eq!(s.node_connections(node).await.unwrap().len(), 1);
        }
        // Closed on b: the device has no connection left, but a still
        // holds it until a itself goes.
        s.disconnect(&b, 2_000, 5_000).await.unwrap();
        assert_eq!(s.heartbeat("b", 2_100).await.unwrap().connections, 0);
        assert_eq!(s.node_connections("a").await.unwrap(), vec![a.clone()]);
        assert_eq!(s.lock().strays.len(), 1);
        s.node_gone("a", 3_000, 5_000).await.unwrap();
        assert!(s.lock().strays.is_empty());
        let left = s.take_departures(7_000).await.unwrap();
        assert_eq!(left.len(), 1);
        assert!(left[0].user_went_offline);
        assert_eq!(left[0].meta.phx_ref, a.conn_id);
    }
}
