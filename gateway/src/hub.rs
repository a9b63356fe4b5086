//! Local fan-out: one bus subscription per subject this node needs, shared by
//! every local socket that joined it.
//!
//! The first socket to join a topic subscribes to `<prefix>.topic.<kind>.<id>`;
//! later ones only register; the last to leave drops the subscription. Each
//! event is decoded and encoded once, then the same bytes are queued to every
//! local subscriber. A subscriber whose queue is full is a slow consumer: its
//! queue is cut off (its socket closes with 1013 and the client reconnects and
//! catches up with `lastSeq`) rather than slowing everyone else down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use axum::extract::ws::Utf8Bytes;
use prost::Message as _;
use quckchat_proto::bus::{DirectEvent, MissedEvents, MissedRequest, TopicEvent};
use quckchat_runtime::bus::{
    Bus, BusError, BusMessage, Handler, HandlerGuard, Subjects, Subscription,
};
use quckchat_runtime::queue;
use serde_json::value::RawValue;

use crate::frame::{self, Vsn};

/// What a subject carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    /// `TopicEvent`s for a channel topic.
    Topic,
    /// `DirectEvent`s for a user or a connection.
    Direct,
}

/// A local socket's registration on a subject.
#[derive(Clone)]
pub struct Subscriber {
    pub user_id: Arc<str>,
    /// The socket's queue; cut off ([`queue::Sender::overflow`]) when the
    /// socket falls behind.
    pub tx: queue::Sender<Delivery>,
}

/// One item queued to one socket.
pub struct Delivery {
    /// Which registration it came through (a socket may rejoin a topic).
    pub sub_id: u64,
    pub item: Arc<Item>,
}

pub enum Item {
    Broadcast(Broadcast),
    Direct(DirectEvent),
    /// The bus subscription ended: channels on it must error and rejoin.
    SubscriptionLost {
        topic: Option<String>,
    },
}

/// A topic event, encoded once per serializer for every socket.
pub struct Broadcast {
    pub topic: String,
    pub event: String,
    payload: Box<RawValue>,
    v2: Utf8Bytes,
    v1: OnceLock<Utf8Bytes>,
}

impl Broadcast {
    pub fn new(topic: String, event: String, payload: Box<RawValue>) -> Self {
        let v2 = frame::encode(Vsn::V2, None, None, &topic, &event, payload.get()).into();
        Self {
            topic,
            event,
            payload,
            v2,
            v1: OnceLock::new(),
        }
    }

    /// The frame for a socket speaking `vsn`; cheap to clone.
    pub fn frame(&self, vsn: Vsn) -> Utf8Bytes {
        match vsn {
            Vsn::V2 => self.v2.clone(),
            Vsn::V1 => self
                .v1
                .get_or_init(|| {
                    frame::encode(
                        Vsn::V1,
                        None,
                        None,
                        &self.topic,
                        &self.event,
                        self.payload.get(),
                    )
                    .into()
                })
                .clone(),
        }
    }
}

/// Parses a payload that came from a service: it must be JSON.
pub fn json_payload(bytes: &[u8]) -> Option<Box<RawValue>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let text = if text.is_empty() { "{}" } else { text };
    RawValue::from_string(text.to_owned()).ok()
}

pub struct Hub {
    bus: Arc<dyn Bus>,
    /// Where missed sequenced events are asked for.
    names: Subjects,
    subjects: Arc<SubjectMap>,
    next_sub_id: AtomicU64,
    /// On an in-process bus, one subscription to every user's subject
    /// forwards all of them ([`forward_users`]) to one table of the users'
    /// registrations: a bus subscription, a task and a subject entry per
    /// connected user would cost ~1 KiB each for nothing. On a network bus
    /// each user subject is subscribed apart, so that a node receives only
    /// its own users' events.
    users: Option<Users>,
}

/// Every local user's registrations, on an in-process bus ([`Hub::users`]).
struct Users {
    forwarder: tokio::sync::Mutex<Option<Interest>>,
    table: Arc<UserMap>,
}

/// Registrations by user id (the key is the sockets' own id, shared).
type UserMap = Mutex<HashMap<Arc<str>, Subscribers>>;

/// The subjects this node has registrations on, by name (shared with the
/// entry: one copy of each name).
type SubjectMap = Mutex<HashMap<Arc<str>, Arc<Entry>>>;

/// A subject's local registrations, ordered by id: a vector, since most
/// subjects have one or a few (a user's sockets, a small conversation's
/// members here), where a map's smallest table holds four.
#[derive(Default)]
struct Subscribers(Vec<(u64, Subscriber)>);

impl Subscribers {
    fn insert(&mut self, id: u64, subscriber: Subscriber) {
        match self.0.binary_search_by_key(&id, |(i, _)| *i) {
            Ok(at) => self.0[at].1 = subscriber,
            Err(at) => {
                // Grown one at a time while small (the first growth would
                // make four), by doubling beyond.
                if self.0.len() == self.0.capacity() && self.0.len() < 4 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, (id, subscriber));
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Ok(at) = self.0.binary_search_by_key(&id, |(i, _)| *i) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// How long a topic's deliveries wait for the events it missed.
pub const GAP_FILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

struct Entry {
    subject: Arc<str>,
    kind: SubjectKind,
    subscribers: RwLock<Subscribers>,
    interest: tokio::sync::OnceCell<Interest>,
    /// The bus subscription ended; the next registration starts a new entry.
    ended: AtomicBool,
    /// The topic's sequence as a join reply reported it (`lastSeq` + 1; 0:
    /// none yet): gap filling starts from it ([`GapFill`]).
    floor: AtomicU64,
}

/// A registration made by [`Hub::register`].
pub struct Registration {
    entry: Arc<Entry>,
    sub_id: u64,
}

/// What keeps a subject's bus subscription, counted in
/// `quckchat_gateway_subscriptions` while it lives and ended (dropping the
/// subscription) with its entry: a forwarder task (every user's on the
/// in-process bus), or a handler the bus calls (a topic's: [`TopicHandler`];
/// a user's or a connection's subject: [`DirectHandler`]).
enum Interest {
    Task(tokio::task::JoinHandle<()>),
    Handler(#[allow(dead_code, reason = "held: dropping it unsubscribes")] HandlerGuard),
}

impl Interest {
    fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        metrics::gauge!("quckchat_gateway_subscriptions").increment(1.0);
        Self::Task(tokio::spawn(task))
    }

    fn handler(guard: HandlerGuard) -> Self {
        metrics::gauge!("quckchat_gateway_subscriptions").increment(1.0);
        Self::Handler(guard)
    }

    fn is_finished(&self) -> bool {
        matches!(self, Self::Task(task) if task.is_finished())
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        metrics::gauge!("quckchat_gateway_subscriptions").decrement(1.0);
        if let Self::Task(task) = self {
            task.abort();
        }
    }
}

impl Hub {
    pub fn new(bus: Arc<dyn Bus>, names: Subjects) -> Self {
        let users = bus.in_process().then(|| Users {
            forwarder: tokio::sync::Mutex::new(None),
            table: Arc::default(),
        });
        Self {
            bus,
            names,
            subjects: Arc::new(Mutex::new(HashMap::new())),
            next_sub_id: AtomicU64::new(1),
            users,
        }
    }

    /// A fresh registration id.
    pub fn next_sub_id(&self) -> u64 {
        self.next_sub_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Subjects this node has registrations on: topics, users.
    pub fn subject_count(&self) -> usize {
        let users = self.users.as_ref().map_or(0, |u| lock(&u.table).len());
        self.lock().len() + users
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Entry>>> {
        lock(&self.subjects)
    }

    /// Registers `subscriber` on `subject`; returns once the bus delivers
    /// that subject's messages to this node.
    pub async fn subscribe(
        &self,
        subject: &str,
        kind: SubjectKind,
        sub_id: u64,
        subscriber: Subscriber,
    ) -> Result<(), BusError> {
        let registration = self.register(subject, kind, sub_id, subscriber);
        self.ready(&registration).await
    }

    /// Registers `subscriber` on `subject` now (so an unsubscribe that
    /// follows always finds it); deliveries start once [`Hub::ready`] has
    /// returned.
    pub fn register(
        &self,
        subject: &str,
        kind: SubjectKind,
        sub_id: u64,
        subscriber: Subscriber,
    ) -> Registration {
        let mut subjects = self.lock();
        let current = subjects
            .get(subject)
            .filter(|e| !e.ended.load(Ordering::Relaxed))
            .cloned();
        let entry = current.unwrap_or_else(|| {
            // New, or its bus subscription ended: start over.
            let name: Arc<str> = subject.into();
            let entry = Arc::new(Entry {
                subject: name.clone(),
                kind,
                subscribers: RwLock::new(Subscribers::default()),
                interest: tokio::sync::OnceCell::new(),
                ended: AtomicBool::new(false),
                floor: AtomicU64::new(0),
            });
            subjects.insert(name, entry.clone());
            entry
        });
        entry
            .subscribers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sub_id, subscriber);
        Registration { entry, sub_id }
    }

    /// Waits until the bus delivers the registration's subject to this node;
    /// on failure the registration is removed.
    pub async fn ready(&self, registration: &Registration) -> Result<(), BusError> {
        let entry = &registration.entry;
        let ready = entry
            .interest
            .get_or_try_init(|| async {
                let weak = Arc::downgrade(entry);
                Ok::<_, BusError>(match entry.kind {
                    SubjectKind::Topic => {
                        let handler = TopicHandler(Arc::new(TopicState {
                            entry: weak,
                            gaps: GapFill {
                                bus: self.bus.clone(),
                                names: self.names.clone(),
                            },
                            sequence: Mutex::default(),
                        }));
                        let guard = self.bus.subscribe_with(&entry.subject, Arc::new(handler));
                        Interest::handler(guard.await?)
                    }
                    SubjectKind::Direct => {
                        let handler = Arc::new(DirectHandler(weak));
                        Interest::handler(self.bus.subscribe_with(&entry.subject, handler).await?)
                    }
                })
            })
            .await;
        match ready {
            Ok(_) => Ok(()),
            Err(err) => {
                self.unsubscribe(&entry.subject, registration.sub_id);
                Err(err)
            }
        }
    }

    /// Registers a socket on its user's subject; returns once the bus
    /// delivers that subject's messages to this node.
    pub async fn subscribe_user(
        &self,
        user_id: &Arc<str>,
        sub_id: u64,
        subscriber: Subscriber,
    ) -> Result<(), BusError> {
        let Some(users) = &self.users else {
            let subject = self.names.user(user_id);
            return self
                .subscribe(&subject, SubjectKind::Direct, sub_id, subscriber)
                .await;
        };
        lock(&users.table)
            .entry(user_id.clone())
            .or_default()
            .insert(sub_id, subscriber);
        let ready = self.users_ready(users).await;
        if ready.is_err() {
            self.unsubscribe_user(user_id, sub_id);
        }
        ready
    }

    /// Removes a registration made by [`Hub::subscribe_user`].
    pub fn unsubscribe_user(&self, user_id: &str, sub_id: u64) {
        let Some(users) = &self.users else {
            return self.unsubscribe(&self.names.user(user_id), sub_id);
        };
        let mut table = lock(&users.table);
        if let Some(subs) = table.get_mut(user_id) {
            subs.remove(sub_id);
            if subs.is_empty() {
                table.remove(user_id);
            }
        }
    }

    /// Starts the node's subscription to every user subject unless it runs.
    async fn users_ready(&self, users: &Users) -> Result<(), BusError> {
        let mut forwarder = users.forwarder.lock().await;
        if forwarder.as_ref().is_some_and(|f| !f.is_finished()) {
            return Ok(());
        }
        let sub = self.bus.subscribe(&self.names.all_users(), None).await?;
        *forwarder = Some(Interest::spawn(forward_users(
            Arc::downgrade(&users.table),
            self.names.user(""),
            sub,
        )));
        Ok(())
    }

    /// A join reply on `subject`'s topic said its sequence stood at
    /// `last_seq`: a later event beyond `last_seq + 1` is a gap, even if it is
    /// the first this node sees on the topic.
    pub fn note_seq(&self, subject: &str, last_seq: u64) {
        if let Some(entry) = self.lock().get(subject) {
            entry
                .floor
                .fetch_max(last_seq.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Removes a registration; the last one out drops the bus subscription.
    pub fn unsubscribe(&self, subject: &str, sub_id: u64) {
        let removed = {
            let mut subjects = self.lock();
            let Some(entry) = subjects.get(subject) else {
                return;
            };
            let mut subs = entry.subscribers.write().unwrap_or_else(|e| e.into_inner());
            subs.remove(sub_id);
            let empty = subs.is_empty();
            drop(subs);
            if empty {
                subjects.remove(subject)
            } else {
                None
            }
        };
        // Dropped outside the lock: the forwarder (and its bus subscription)
        // goes with the entry's last reference.
        drop(removed);
    }
}

/// A topic's events as the bus reads them ([`Bus::subscribe_with`]): each
/// is delivered at once by the bus's caller, unless events before it were
/// missed ([`GapFill`]) or the topic has more than [`DELIVER_INLINE_MAX`]
/// sockets here; then a task delivers it (after fetching what was missed)
/// and the events that came meanwhile, in order, and ends when none is
/// left. No task waits per topic.
struct TopicHandler(Arc<TopicState>);

/// Sockets of a topic on this node past which its events are delivered by a
/// task rather than by the bus's caller: the in-process publisher (a chat
/// send, whose reply waits) or the NATS connection's reader (every other
/// subject waits) does not queue a big room's fan-out itself. Measured with
/// `bench fanout` (bench/ANALYSIS.md).
pub(crate) const DELIVER_INLINE_MAX: usize = 64;

struct TopicState {
    entry: Weak<Entry>,
    gaps: GapFill,
    sequence: Mutex<Sequence>,
}

/// Where a topic's sequence stands on this node.
#[derive(Default)]
struct Sequence {
    last_seq: Option<u64>,
    /// While a fill runs: the events that came since, in order.
    held: Option<Vec<Event>>,
}

/// A topic event off the bus: the item, the user it skips, its seq (0 when
/// not sequenced).
type Event = (Item, Option<String>, u64);

impl Handler for TopicHandler {
    fn on_message(&self, msg: BusMessage) {
        let Some(entry) = self.0.entry.upgrade() else {
            return;
        };
        let Some(event) = decode(entry.kind, &msg) else {
            undecodable(&msg);
            return;
        };
        let big = {
            let subscribers = entry.subscribers.read();
            subscribers.unwrap_or_else(|e| e.into_inner()).len() > DELIVER_INLINE_MAX
        };
        let mut sequence = lock(&self.0.sequence);
        if let Some(held) = &mut sequence.held {
            held.push(event);
            return;
        }
        let gap = sequence.gap_before(&entry, &event);
        if gap.is_none() && !big {
            drop(sequence);
            deliver(&entry, event);
            return;
        }
        sequence.held = Some(Vec::new());
        drop(sequence);
        tokio::spawn(self.0.clone().deliver_in_order(gap, event));
    }

    fn on_end(&self) {
        if let Some(entry) = self.0.entry.upgrade() {
            subscription_ended(&entry);
        }
    }
}

impl TopicState {
    /// Fills `gap` (the events missed after that seq, if any) and delivers
    /// `first`, then the events held meanwhile (filling any gap among
    /// them), until none is held.
    async fn deliver_in_order(self: Arc<Self>, gap: Option<u64>, first: Event) {
        let mut gap = gap;
        // Whether the next event's gap is known (the first's is).
        let mut noted = true;
        let mut batch = std::collections::VecDeque::from([first]);
        loop {
            while let Some(event) = batch.pop_front() {
                let Some(entry) = self.entry.upgrade() else {
                    return;
                };
                if !noted {
                    gap = lock(&self.sequence).gap_before(&entry, &event);
                }
                noted = false;
                if let (Some(last), Item::Broadcast(b)) = (gap.take(), &event.0) {
                    self.gaps.fill(&entry, &b.topic, last, event.2).await;
                }
                deliver(&entry, event);
            }
            let mut sequence = lock(&self.sequence);
            match sequence.held.take() {
                Some(held) if !held.is_empty() => {
                    sequence.held = Some(Vec::new());
                    batch = held.into();
                }
                // Nothing held: from here events are delivered at once.
                _ => return,
            }
        }
    }
}

impl Sequence {
    /// Notes a sequenced broadcast; the last seq known before it, if events
    /// between the two were missed.
    fn gap_before(&mut self, entry: &Entry, event: &Event) -> Option<u64> {
        let seq = event.2;
        if seq == 0 || !matches!(event.0, Item::Broadcast(_)) {
            return None;
        }
        let floor = entry.floor.load(Ordering::Relaxed).checked_sub(1);
        let known = match (self.last_seq, floor) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.last_seq = Some(known.map_or(seq, |l| l.max(seq)));
        known.filter(|last| seq > last.saturating_add(1))
    }
}

fn deliver(entry: &Entry, (item, exclude_user, _): Event) {
    fan_out_entry(entry, Arc::new(item), exclude_user.as_deref());
}

/// Delivers a user's or a connection's events to its local subscribers as
/// the bus reads them (over NATS, every connected user has one: no task or
/// queue each; on the in-process bus [`forward_users`] serves them all).
struct DirectHandler(Weak<Entry>);

impl Handler for DirectHandler {
    fn on_message(&self, msg: BusMessage) {
        if let Some(entry) = self.0.upgrade() {
            deliver_direct(&entry, &msg);
        }
    }

    fn on_end(&self) {
        if let Some(entry) = self.0.upgrade() {
            subscription_ended(&entry);
        }
    }
}

/// Moves every user's events from the in-process bus to the user's local
/// sockets ([`Hub::users`]); `prefix` is what precedes a user id in a user
/// subject. It awaits nothing but the bus.
async fn forward_users(table: Weak<UserMap>, prefix: String, mut sub: Subscription) {
    while let Some(msg) = sub.next().await {
        let Some(table) = table.upgrade() else {
            return;
        };
        let Some(user_id) = msg.subject.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let table = lock(&table);
        // No registration: none of the user's sockets is here.
        let Some(subs) = table.get(user_id) else {
            continue;
        };
        match decode(SubjectKind::Direct, &msg) {
            Some((item, _, _)) => fan_out(subs, Arc::new(item), None),
            None => undecodable(&msg),
        }
    }
    // Every user subject went with it: their sockets learn it (and close),
    // and the next registration subscribes again.
    if let Some(table) = table.upgrade() {
        let lost = Arc::new(Item::SubscriptionLost { topic: None });
        for subs in lock(&table).values() {
            fan_out(subs, lost.clone(), None);
        }
    }
}

/// One user's or connection's event to its local subscribers.
fn deliver_direct(entry: &Entry, msg: &BusMessage) {
    match decode(SubjectKind::Direct, msg) {
        Some((item, exclude_user, _)) => {
            fan_out_entry(entry, Arc::new(item), exclude_user.as_deref());
        }
        None => undecodable(msg),
    }
}

fn lock<T>(map: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    map.lock().unwrap_or_else(|e| e.into_inner())
}

fn undecodable(msg: &BusMessage) {
    metrics::counter!("quckchat_gateway_bad_events_total").increment(1);
    tracing::warn!(subject = %msg.subject, "undecodable event dropped");
}

/// The bus closed the subscription (e.g. connection lost for good): its
/// sockets learn it, and the next registration starts a new entry.
fn subscription_ended(entry: &Entry) {
    entry.ended.store(true, Ordering::Relaxed);
    fan_out_entry(
        entry,
        Arc::new(Item::SubscriptionLost { topic: None }),
        None,
    );
}

/// Gap-free delivery of a topic's sequenced events (chat's `message:new`):
/// the bus delivers at most once, so an event can be lost between a service
/// and this node while every socket stays open. Seeing seq N after N-k-1,
/// this node asks the topic's service for the k missing events and delivers
/// them, in order, before N. Events at or below the last seq seen (a retried
/// send published again, or a fill that overtook its broadcast) are
/// delivered as they come: clients dedupe by id.
///
/// Where the sequence starts: the `lastSeq` of a join reply on the topic
/// ([`Hub::note_seq`]), else the first sequenced event seen.
struct GapFill {
    bus: Arc<dyn Bus>,
    names: Subjects,
}

impl GapFill {
    /// Delivers the events after `last` and before `seq`, fetched from the
    /// topic's service.
    async fn fill(&self, entry: &Entry, topic: &str, last: u64, seq: u64) {
        let result = match self.fetch(topic, last, seq).await {
            Ok(missed) => {
                for (event, payload) in missed {
                    fan_out_entry(
                        entry,
                        Arc::new(Item::Broadcast(Broadcast::new(
                            topic.to_owned(),
                            event,
                            payload,
                        ))),
                        None,
                    );
                }
                "filled"
            }
            Err(err) => {
                tracing::warn!(%topic, after = last, before = seq, %err, "missed events not fetched");
                "failed"
            }
        };
        metrics::counter!("quckchat_gateway_gap_fills_total", "result" => result).increment(1);
    }

    async fn fetch(
        &self,
        topic: &str,
        after_seq: u64,
        before_seq: u64,
    ) -> Result<Vec<(String, Box<RawValue>)>, String> {
        let service = quckchat_runtime::routes::route(topic)
            .map_err(|e| e.to_string())?
            .service;
        let request = MissedRequest {
            topic: topic.to_owned(),
            after_seq,
            before_seq,
        };
        let reply = self
            .bus
            .request(
                &self.names.service_event(service, "missed"),
                Vec::new(),
                request.encode_to_vec().into(),
                GAP_FILL_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
        let events = MissedEvents::decode(reply.payload.as_ref()).map_err(|e| e.to_string())?;
        Ok(events
            .events
            .into_iter()
            .filter(|e| e.seq > after_seq && e.seq < before_seq)
            .filter_map(|e| Some((e.event, json_payload(&e.payload)?)))
            .collect())
    }
}

/// An event off the bus: the item, the user it skips, its seq (0 when not
/// sequenced).
fn decode(kind: SubjectKind, msg: &BusMessage) -> Option<(Item, Option<String>, u64)> {
    match kind {
        SubjectKind::Topic => {
            let ev = TopicEvent::decode(msg.payload.as_ref()).ok()?;
            let payload = json_payload(&ev.payload)?;
            let exclude = (!ev.exclude_user_id.is_empty()).then_some(ev.exclude_user_id);
            Some((
                Item::Broadcast(Broadcast::new(ev.topic, ev.event, payload)),
                exclude,
                ev.seq,
            ))
        }
        SubjectKind::Direct => Some((
            Item::Direct(DirectEvent::decode(msg.payload.as_ref()).ok()?),
            None,
            0,
        )),
    }
}

/// Queues `item` to each of an entry's registrations.
fn fan_out_entry(entry: &Entry, item: Arc<Item>, exclude_user: Option<&str>) {
    let subs = entry.subscribers.read().unwrap_or_else(|e| e.into_inner());
    fan_out(&subs, item, exclude_user);
}

fn fan_out(subs: &Subscribers, item: Arc<Item>, exclude_user: Option<&str>) {
    let mut delivered = 0u64;
    for (sub_id, s) in subs.0.iter() {
        if exclude_user.is_some_and(|u| u == &*s.user_id) {
            continue;
        }
        match s.tx.try_send(Delivery {
            sub_id: *sub_id,
            item: item.clone(),
        }) {
            Ok(()) => delivered += 1,
            Err(queue::TrySendError::Full(_)) => {
                // Counted once per socket closed: later sends to it fail
                // as closed.
                if s.tx.overflow() {
                    metrics::counter!("quckchat_gateway_slow_consumers_total").increment(1);
                }
            }
            Err(queue::TrySendError::Closed(_)) => {}
        }
    }
    metrics::counter!("quckchat_gateway_deliveries_total").increment(delivered);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(user: &str) -> Subscriber {
        Subscriber {
            user_id: user.into(),
            tx: queue::bounded(1).0,
        }
    }

    fn users(s: &Subscribers) -> Vec<(u64, &str)> {
        s.0.iter().map(|(id, s)| (*id, &*s.user_id)).collect()
    }

    #[test]
    fn subscribers_stay_ordered_by_id_and_small_ones_hold_no_spare_slots() {
        let mut s = Subscribers::default();
        s.insert(7, subscriber("a"));
        assert_eq!(s.0.capacity(), 1, "one registration, one slot");
        s.insert(3, subscriber("b"));
        s.insert(9, subscriber("c"));
        // A registration made again under its id replaces the first.
        s.insert(3, subscriber("b2"));
        assert_eq!(users(&s), vec![(3, "b2"), (7, "a"), (9, "c")]);
        assert_eq!(s.0.capacity(), 3);
        s.remove(7);
        s.remove(42);
        assert_eq!(users(&s), vec![(3, "b2"), (9, "c")]);
        for id in 10..100 {
            s.insert(id, subscriber("many"));
        }
        assert_eq!(s.0.len(), 92);
        assert!(s.0.windows(2).all(|w| w[0].0 < w[1].0));
        s.remove(3);
        s.remove(9);
        assert!(!s.is_empty());
        for id in 10..100 {
            s.remove(id);
        }
        assert!(s.is_empty());
    }
}
