//! The bus: how gateways and services exchange commands and events.
//!
//! One trait, two implementations: [`NatsBus`] (distributed mode, core NATS)
//! and [`MemoryBus`] (the all-in-one server, in-process). Both pass one
//! conformance suite ([`conformance`]), so code above this seam cannot tell
//! them apart. Semantics follow core NATS:
//!
//! - subjects are dot-separated tokens; subscriptions may use `*` (one token)
//!   and `>` (one or more trailing tokens);
//! - subscribers in the same queue group share messages (each message goes to
//!   one of them); other subscribers each get every message;
//! - delivery is at-most-once: a subscriber that falls behind by more than its
//!   buffer loses messages (counted in `quckchat_bus_dropped_total`);
//! - `request` fails fast with [`BusError::NoResponders`] when nobody listens,
//!   and with [`BusError::TimedOut`] when nobody answers in time (counted in
//!   `quckchat_bus_request_timeouts_total`);
//! - dropping a [`Subscription`] unsubscribes.

mod memory;
mod nats;
mod nats_subs;
pub mod subjects;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub use memory::MemoryBus;
pub use nats::NatsBus;
pub use subjects::Subjects;

/// Message headers, e.g. W3C `traceparent`. Small, so a vector.
pub type Headers = Vec<(String, String)>;

/// A message as received from the bus.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub subject: String,
    /// Where to send a reply, for requests.
    pub reply: Option<String>,
    pub headers: Headers,
    pub payload: Bytes,
}

impl BusMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("no responders on {0}")]
    NoResponders(String),
    #[error("request to {0} timed out")]
    TimedOut(String),
    #[error("invalid subject {0:?}")]
    InvalidSubject(String),
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes a message; `reply` names where responders should answer.
    async fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError>;

    /// Subscribes to `subject` (wildcards allowed), optionally in a queue
    /// group. Once this returns, messages published afterwards are delivered.
    async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscription, BusError>;

    /// Subscribes `subject` (exact, no queue group) with a handler the bus
    /// calls for each message instead of a stream: for subjects a node holds
    /// by the thousand (a gateway's users), which then need no task and no
    /// queue each. The bus calls the handler as it reads a message (over
    /// NATS its connection's reader; in process the publisher itself, so
    /// two publishers may call it at once), in each publisher's order; it
    /// must not block. Once this returns, messages published afterwards are
    /// delivered; dropping the guard unsubscribes.
    ///
    /// By default a task per subscription feeds the handler from
    /// [`Bus::subscribe`]; a bus that can call it directly does.
    async fn subscribe_with(
        &self,
        subject: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<HandlerGuard, BusError> {
        Ok(feed(self.subscribe(subject, None).await?, handler))
    }

    /// Sends a request and waits for the first reply.
    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<BusMessage, BusError>;

    /// Whether the bus is usable right now (for readiness).
    fn is_connected(&self) -> bool;

    /// Short name for logs and health output.
    fn kind(&self) -> &'static str;

    /// Every subscriber of this bus is in this process (the all-in-one
    /// server's bus): a wildcard subscription carries nothing over a wire,
    /// so one can serve many subjects that a network bus would route apart.
    fn in_process(&self) -> bool {
        false
    }
}

/// What a subscription made with [`Bus::subscribe_with`] calls.
pub trait Handler: Send + Sync + 'static {
    /// A message on the subject.
    fn on_message(&self, msg: BusMessage);
    /// The subscription ended (the bus gave it up): nothing more will come.
    fn on_end(&self);
}

/// Keeps a [`Bus::subscribe_with`] subscription; dropping it unsubscribes.
pub struct HandlerGuard {
    _inner: Box<dyn Send + Sync>,
}

impl HandlerGuard {
    pub(crate) fn new(inner: impl Send + Sync + 'static) -> Self {
        Self {
            _inner: Box::new(inner),
        }
    }
}

/// Feeds `handler` from `sub` on a task of its own, stopped with the guard
/// (the default [`Bus::subscribe_with`]).
pub(crate) fn feed(mut sub: Subscription, handler: Arc<dyn Handler>) -> HandlerGuard {
    HandlerGuard::new(AbortTask(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            handler.on_message(msg);
        }
        handler.on_end();
    })))
}

struct AbortTask(tokio::task::JoinHandle<()>);

impl Drop for AbortTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Answers a request message; a message without a reply subject is ignored.
pub async fn respond(bus: &dyn Bus, to: &BusMessage, payload: Bytes) -> Result<(), BusError> {
    match &to.reply {
        Some(reply) => bus.publish(reply, None, Vec::new(), payload).await,
        None => Ok(()),
    }
}

/// A stream of messages for one subscription; dropping it unsubscribes.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = BusMessage> + Send>>,
}

impl Subscription {
    pub(crate) fn new(inner: impl Stream<Item = BusMessage> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(inner),
        }
    }

    /// The next message, or `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<BusMessage> {
        futures::StreamExt::next(self).await
    }
}

impl Stream for Subscription {
    type Item = BusMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BusMessage>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Checks a subject or subscription pattern: non-empty tokens without
/// whitespace; `>` only last. Wildcards only when `pattern`.
pub(crate) fn validate_subject(subject: &str, pattern: bool) -> Result<(), BusError> {
    let invalid = || BusError::InvalidSubject(subject.to_owned());
    if subject.is_empty() {
        return Err(invalid());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() || t.chars().any(char::is_whitespace) {
            return Err(invalid());
        }
        let wild = is_wildcard(t);
        if wild && (!pattern || (*t == ">" && i + 1 != tokens.len())) {
            return Err(invalid());
        }
    }
    Ok(())
}

/// Whether a subscription pattern has a wildcard token (`*` or `>`).
pub(crate) fn is_pattern(subject: &str) -> bool {
    subject.split('.').any(is_wildcard)
}

fn is_wildcard(token: &str) -> bool {
    token == "*" || token == ">"
}

/// Counts a request that got no reply in time, labelled by the bus and the
/// subject's kind (`cmd`, `gateway`, … — never ids). Off the hot path: only
/// timeouts come here.
pub(crate) fn count_request_timeout(bus: &'static str, subject: &str) {
    const KINDS: [&str; 6] = ["cmd", "gateway", "svc", "topic", "user", "conn"];
    let kind = subject
        .split('.')
        .find_map(|t| KINDS.into_iter().find(|k| *k == t))
        .unwrap_or("other");
    metrics::counter!("quckchat_bus_request_timeouts_total", "bus" => bus, "subject" => kind)
        .increment(1);
}

/// Whether `subject` matches the subscription `pattern`.
pub(crate) fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("*.b.>", "x.b.y"));
    }

    #[test]
    fn validation() {
        assert!(validate_subject("qc.cmd.chat", false).is_ok());
        assert!(validate_subject("qc.>", true).is_ok());
        assert!(validate_subject("qc.>", false).is_err());
        assert!(validate_subject("qc.>.x", true).is_err());
        assert!(validate_subject("qc..x", true).is_err());
        assert!(validate_subject("qc.a b", true).is_err());
        assert!(validate_subject("", true).is_err());
    }

    #[tokio::test]
    async fn memory_bus_conformance() {
        conformance::run_all(|| async {
            std::sync::Arc::new(MemoryBus::new()) as std::sync::Arc<dyn Bus>
        })
        .await;
    }

    #[tokio::test]
    async fn nats_bus_conformance() {
        let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        conformance::run_all(|| {
            let url = url.clone();
            async move {
                std::sync::Arc::new(NatsBus::connect(&url, "conformance").await.expect(
                    "NATS must be reachable for the bus conformance suite (scripts/deps.sh starts it)",
                )) as std::sync::Arc<dyn Bus>
            }
        })
        .await;
    }
}
