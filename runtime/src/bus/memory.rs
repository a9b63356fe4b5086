//! The in-process bus of the all-in-one server: core-NATS semantics without a
//! network. Exact subjects are found by hash lookup; wildcard subscriptions
//! (few: services' command subjects) are scanned. A handler subscription
//! ([`Bus::subscribe_with`]) is called by the publisher itself: no task and
//! no queue between a publish and the gateway's sockets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::queue;

use super::{
    count_request_timeout, is_pattern, subject_matches, validate_subject, Bus, BusError,
    BusMessage, Handler, HandlerGuard, Headers, Subscription,
};

/// Messages buffered per subscription before newer ones are dropped (as a
/// NATS slow consumer would lose them).
const SUBSCRIPTION_CAPACITY: usize = 65_536;

#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    registry: RwLock<Registry>,
    next_id: AtomicU64,
    /// Requests waiting for their reply, by inbox: a reply goes straight
    /// to its waiter instead of through a subscription per request.
    waiting: Waiters,
}

/// Inbox subjects of this bus's own requests.
const INBOX_PREFIX: &str = "_INBOX.";

#[derive(Default)]
struct Registry {
    exact: HashMap<String, Vec<Entry>>,
    wildcard: Vec<(String, Entry)>,
}

#[derive(Clone)]
struct Entry {
    id: u64,
    queue_group: Option<String>,
    sink: Sink,
}

#[derive(Clone)]
enum Sink {
    /// A [`Subscription`]'s queue. The message is shared, not cloned, per
    /// subscriber: a queue slot is one pointer, and an empty queue holds no
    /// buffer.
    Queue(queue::Sender<Arc<BusMessage>>),
    /// Called by the publisher, outside the registry's lock (a handler may
    /// drop a subscription).
    Handler(Arc<dyn Handler>),
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                registry: RwLock::new(Registry::default()),
                next_id: AtomicU64::new(1),
                waiting: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Delivers to every matching subscriber (one per queue group); returns
    /// how many subscriptions matched.
    fn deliver(&self, msg: BusMessage) -> usize {
        if msg.subject.starts_with(INBOX_PREFIX) {
            let waiter = self
                .inner
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&msg.subject);
            if let Some(waiter) = waiter {
                return usize::from(waiter.send(msg).is_ok());
            }
        }
        let msg = Arc::new(msg);
        let mut handlers: Vec<Arc<dyn Handler>> = Vec::new();
        let matched = {
            let registry = self
                .inner
                .registry
                .read()
                .unwrap_or_else(|e| e.into_inner());
            let mut plain: Vec<&Entry> = Vec::new();
            let mut groups: HashMap<&str, Vec<&Entry>> = HashMap::new();
            let exact = registry.exact.get(&msg.subject).into_iter().flatten();
            let wild = registry
                .wildcard
                .iter()
                .filter(|(pattern, _)| subject_matches(pattern, &msg.subject))
                .map(|(_, e)| e);
            for entry in exact.chain(wild) {
                if matches!(&entry.sink, Sink::Queue(tx) if tx.is_closed()) {
                    continue;
                }
                match &entry.queue_group {
                    Some(g) => groups.entry(g.as_str()).or_default().push(entry),
                    None => plain.push(entry),
                }
            }
            let mut targets = plain;
            for members in groups.values() {
                targets.push(members[rand::random_range(0..members.len())]);
            }
            for entry in &targets {
                match &entry.sink {
                    Sink::Queue(tx) => {
                        if tx.try_send(msg.clone()).is_err() {
                            metrics::counter!("quckchat_bus_dropped_total", "bus" => "memory")
                                .increment(1);
                        }
                    }
                    Sink::Handler(h) => handlers.push(h.clone()),
                }
            }
            targets.len()
        };
        // Outside the lock. The last handler takes the message itself unless
        // a queue still shares it; the others a copy.
        if let Some(last) = handlers.pop() {
            for handler in handlers {
                handler.on_message((*msg).clone());
            }
            last.on_message(Arc::try_unwrap(msg).unwrap_or_else(|m| (*m).clone()));
        }
        matched
    }

    fn add(&self, subject: &str, queue_group: Option<&str>, sink: Sink) -> Unsubscribe {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            id,
            queue_group: queue_group.map(str::to_owned),
            sink,
        };
        let mut registry = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if is_pattern(subject) {
            registry.wildcard.push((subject.to_owned(), entry));
        } else {
            registry
                .exact
                .entry(subject.to_owned())
                .or_default()
                .push(entry);
        }
        Unsubscribe {
            bus: Arc::downgrade(&self.inner),
            subject: subject.to_owned(),
            id,
        }
    }
}

type Waiters = std::sync::Mutex<HashMap<String, tokio::sync::oneshot::Sender<BusMessage>>>;

/// A request's place in the waiting map, given up when the request ends.
struct Waiting<'a> {
    map: &'a Waiters,
    inbox: String,
}

impl<'a> Waiting<'a> {
    fn register(
        map: &'a Waiters,
        inbox: String,
        reply: tokio::sync::oneshot::Sender<BusMessage>,
    ) -> Self {
        map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(inbox.clone(), reply);
        Self { map, inbox }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.inbox);
    }
}

/// Removes a subscription from the registry when its stream is dropped.
struct Unsubscribe {
    bus: Weak<Inner>,
    subject: String,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let Some(inner) = self.bus.upgrade() else {
            return;
        };
        let mut registry = inner.registry.write().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = registry.exact.get_mut(&self.subject) {
            list.retain(|e| e.id != self.id);
            if list.is_empty() {
                registry.exact.remove(&self.subject);
            }
        }
        registry.wildcard.retain(|(_, e)| e.id != self.id);
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        validate_subject(subject, false)?;
        self.deliver(BusMessage {
            subject: subject.to_owned(),
            reply: reply.map(str::to_owned),
            headers,
            payload,
        });
        Ok(())
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscription, BusError> {
        validate_subject(subject, true)?;
        let (tx, rx) = queue::bounded(SUBSCRIPTION_CAPACITY);
        let guard = self.add(subject, queue_group, Sink::Queue(tx));
        Ok(Subscription::new(MemoryStream { rx, _guard: guard }))
    }

    async fn subscribe_with(
        &self,
        subject: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<HandlerGuard, BusError> {
        validate_subject(subject, false)?;
        Ok(HandlerGuard::new(self.add(
            subject,
            None,
            Sink::Handler(handler),
        )))
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<BusMessage, BusError> {
        validate_subject(subject, false)?;
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let inbox = format!("{INBOX_PREFIX}{n}");
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        // Removed however this ends: reply, timeout, or the caller giving up.
        let _waiting = Waiting::register(&self.inner.waiting, inbox.clone(), reply_tx);
        let matched = self.deliver(BusMessage {
            subject: subject.to_owned(),
            reply: Some(inbox),
            headers,
            payload,
        });
        if matched == 0 {
            return Err(BusError::NoResponders(subject.to_owned()));
        }
        match tokio::time::timeout(timeout, reply_rx).await {
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(_)) => Err(BusError::Unavailable("reply waiter dropped".into())),
            Err(_) => {
                count_request_timeout("memory", subject);
                Err(BusError::TimedOut(subject.to_owned()))
            }
        }
    }

    fn is_connected(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn in_process(&self) -> bool {
        true
    }
}

/// One subscription's messages; dropping it unsubscribes.
struct MemoryStream {
    rx: queue::Receiver<Arc<BusMessage>>,
    _guard: Unsubscribe,
}

impl Stream for MemoryStream {
    type Item = BusMessage;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<BusMessage>> {
        self.rx
            .poll_recv(cx)
            .map(|m| m.map(|m| Arc::try_unwrap(m).unwrap_or_else(|shared| (*shared).clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn abandoned_requests_leave_no_waiter() {
        let bus = MemoryBus::new();
        let _silent = bus.subscribe("svc.silent", None).await.unwrap();
        let req = bus.request(
            "svc.silent",
            Vec::new(),
            Bytes::new(),
            Duration::from_secs(60),
        );
        // The caller gives up (e.g. its socket closed) before any reply.
        assert!(tokio::time::timeout(Duration::from_millis(20), req)
            .await
            .is_err());
        assert!(bus.inner.waiting.lock().unwrap().is_empty());
        let timed_out = bus
            .request(
                "svc.silent",
                Vec::new(),
                Bytes::new(),
                Duration::from_millis(10),
            )
            .await;
        assert!(matches!(timed_out, Err(BusError::TimedOut(_))));
        assert!(bus.inner.waiting.lock().unwrap().is_empty());
    }

    /// Counts what it is given.
    struct Count(std::sync::atomic::AtomicUsize);

    impl Handler for Count {
        fn on_message(&self, _: BusMessage) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn on_end(&self) {}
    }

    #[tokio::test]
    async fn handlers_are_called_by_the_publisher_beside_queued_subscribers() {
        let bus = MemoryBus::new();
        let (one, two) = (
            Arc::new(Count(Default::default())),
            Arc::new(Count(Default::default())),
        );
        let _one = bus.subscribe_with("t.a", one.clone()).await.unwrap();
        let _two = bus.subscribe_with("t.a", two.clone()).await.unwrap();
        let mut queued = bus.subscribe("t.a", None).await.unwrap();
        bus.publish("t.a", None, Vec::new(), Bytes::from_static(b"x"))
            .await
            .unwrap();
        // Called before publish returned: no task in between.
        assert_eq!(one.0.load(Ordering::Relaxed), 1);
        assert_eq!(two.0.load(Ordering::Relaxed), 1);
        let msg = queued.next().await.unwrap();
        assert_eq!(&msg.payload[..], b"x");
        drop(_one);
        bus.publish("t.a", None, Vec::new(), Bytes::from_static(b"y"))
            .await
            .unwrap();
        assert_eq!(one.0.load(Ordering::Relaxed), 1, "dropped: not called");
        assert_eq!(two.0.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn request_timeouts_are_counted_by_subject_kind() {
        let metrics = crate::admin::metrics_handle();
        let bus = MemoryBus::new();
        let _sub = bus.subscribe("qc.cmd.silent", None).await.unwrap();
        let series = "quckchat_bus_request_timeouts_total{bus=\"memory\",subject=\"cmd\"}";
        let count = || {
            metrics
                .render()
                .lines()
                .find_map(|l| {
                    l.strip_prefix(series)?
                        .strip_prefix(' ')?
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0)
        };
        let before = count();
        let timed_out = bus
            .request(
                "qc.cmd.silent",
                Vec::new(),
                Bytes::new(),
                Duration::from_millis(10),
            )
            .await;
        assert!(matches!(timed_out, Err(BusError::TimedOut(_))));
        assert_eq!(count(), before + 1);
    }
}
