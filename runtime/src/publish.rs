//! Typed publishing: what services send to clients through the gateways,
//! encoded once here instead of by hand at each call site.
//!
//! Every method carries the publisher's headers (trace context rides there)
//! and returns the bus error for the caller to log with its own context.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use quckchat_proto::bus::{direct_event, ChannelEvent, CloseChannel, DirectEvent, TopicEvent};
use serde_json::Value;

use crate::bus::{Bus, BusError, Headers, Subjects};

/// Publishes to topics, users, connections and a service's replicas.
#[derive(Clone)]
pub struct Publisher {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    headers: Headers,
}

impl Publisher {
    pub fn new(bus: Arc<dyn Bus>, subjects: Subjects) -> Self {
        Self {
            bus,
            subjects,
            headers: Headers::new(),
        }
    }

    /// The same publisher, adding `headers` to everything it sends.
    pub fn with_headers(&self, headers: Headers) -> Self {
        let mut this = self.clone();
        this.headers.extend(headers);
        this
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn bus(&self) -> Arc<dyn Bus> {
        self.bus.clone()
    }

    async fn send(&self, subject: &str, payload: Vec<u8>) -> Result<(), BusError> {
        let mut headers = self.headers.clone();
        // With traces on, what a traced operation publishes carries its
        // trace (push jobs continue it).
        crate::telemetry::inject(&mut headers);
        self.bus
            .publish(subject, None, headers, Bytes::from(payload))
            .await
    }

    /// `event` to every socket that joined `topic` (`kind:id`), except the
    /// sockets of `except_user`.
    pub async fn to_topic(
        &self,
        topic: &str,
        event: &str,
        payload: &Value,
        except_user: Option<&str>,
    ) -> Result<(), BusError> {
        self.to_topic_sequenced(
            topic,
            event,
            payload.to_string().into_bytes(),
            except_user,
            0,
        )
        .await
    }

    /// [`Publisher::to_topic`] for an event with its place `seq` in the
    /// topic's gap-free sequence: gateways that notice a gap fetch what they
    /// missed (`TopicEvent.seq`). `payload` is the event's JSON, encoded.
    pub async fn to_topic_sequenced(
        &self,
        topic: &str,
        event: &str,
        payload: Vec<u8>,
        except_user: Option<&str>,
        seq: u64,
    ) -> Result<(), BusError> {
        let ev = TopicEvent {
            topic: topic.to_owned(),
            event: event.to_owned(),
            payload,
            exclude_user_id: except_user.unwrap_or_default().to_owned(),
            seq,
        };
        self.send(&self.subjects.topic(topic), ev.encode_to_vec())
            .await
    }

    /// `event` on `topic` to every connection of `user_id` that joined it.
    pub async fn to_user(
        &self,
        user_id: &str,
        topic: &str,
        event: &str,
        payload: &Value,
    ) -> Result<(), BusError> {
        self.send(
            &self.subjects.user(user_id),
            push(topic, event, payload, "", ""),
        )
        .await
    }

    /// `event` on `topic` to one connection of `user_id` (one device), if it
    /// joined it: sent on the user's subject, kept only by that connection.
    pub async fn to_connection(
        &self,
        user_id: &str,
        conn_id: &str,
        topic: &str,
        event: &str,
        payload: &Value,
    ) -> Result<(), BusError> {
        self.send(
            &self.subjects.user(user_id),
            push(topic, event, payload, conn_id, ""),
        )
        .await
    }

    /// `event` on `topic` to every connection of `user_id` that joined it
    /// but `except_conn` (the user's other devices).
    pub async fn to_user_except(
        &self,
        user_id: &str,
        except_conn: &str,
        topic: &str,
        event: &str,
        payload: &Value,
    ) -> Result<(), BusError> {
        self.send(
            &self.subjects.user(user_id),
            push(topic, event, payload, "", except_conn),
        )
        .await
    }

    /// Closes `topic` on every connection of `user_id` (`phx_close` with
    /// `{reason}`).
    pub async fn close_channel(
        &self,
        user_id: &str,
        topic: &str,
        reason: &str,
    ) -> Result<(), BusError> {
        self.close(user_id, "", topic, reason).await
    }

    /// Closes `topic` on one connection of `user_id` only (one device).
    pub async fn close_connection_channel(
        &self,
        user_id: &str,
        conn_id: &str,
        topic: &str,
        reason: &str,
    ) -> Result<(), BusError> {
        self.close(user_id, conn_id, topic, reason).await
    }

    async fn close(
        &self,
        user_id: &str,
        conn_id: &str,
        topic: &str,
        reason: &str,
    ) -> Result<(), BusError> {
        let close = DirectEvent {
            topic: topic.to_owned(),
            kind: Some(direct_event::Kind::Close(CloseChannel {
                reason: reason.to_owned(),
            })),
            conn_id: conn_id.to_owned(),
            except_conn_id: String::new(),
        };
        self.send(&self.subjects.user(user_id), close.encode_to_vec())
            .await
    }

    /// A notice to every replica of `service` (no queue group), e.g. chat's
    /// `membership` changes.
    pub async fn notice(
        &self,
        service: &str,
        name: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), BusError> {
        self.send(&self.subjects.service_event(service, name), payload.into())
            .await
    }
}

fn push(topic: &str, event: &str, payload: &Value, conn_id: &str, except_conn: &str) -> Vec<u8> {
    DirectEvent {
        topic: topic.to_owned(),
        kind: Some(direct_event::Kind::Push(ChannelEvent {
            event: event.to_owned(),
            payload: payload.to_string().into_bytes(),
        })),
        conn_id: conn_id.to_owned(),
        except_conn_id: except_conn.to_owned(),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::bus::MemoryBus;

    #[tokio::test]
    async fn each_kind_of_publish_lands_on_its_subject_with_the_headers() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let subjects = Subjects::new("pub");
        let publisher = Publisher::new(bus.clone(), subjects.clone())
            .with_headers(vec![("traceparent".into(), "00-abc-def-01".into())]);
        let mut all = bus.subscribe("pub.>", None).await.unwrap();
        async fn next(sub: &mut crate::bus::Subscription) -> crate::bus::BusMessage {
            tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .unwrap()
                .unwrap()
        }

        publisher
            .to_topic("chat:c1", "message:new", &json!({"a": 1}), Some("u1"))
            .await
            .unwrap();
        let msg = next(&mut all).await;
        assert_eq!(msg.subject, "pub.topic.chat.c1");
        assert_eq!(msg.header("traceparent"), Some("00-abc-def-01"));
        let ev = TopicEvent::decode(msg.payload.as_ref()).unwrap();
        assert_eq!(
            (
                ev.topic.as_str(),
                ev.event.as_str(),
                ev.exclude_user_id.as_str()
            ),
            ("chat:c1", "message:new", "u1")
        );
        assert_eq!(ev.payload, br#"{"a":1}"#);

        publisher
            .to_user("u2", "webrtc:lobby", "call:incoming", &json!({}))
            .await
            .unwrap();
        let msg = next(&mut all).await;
        assert_eq!(msg.subject, "pub.user.u2");
        let ev = DirectEvent::decode(msg.payload.as_ref()).unwrap();
        assert!(matches!(ev.kind, Some(direct_event::Kind::Push(p)) if p.event == "call:incoming"));

        publisher
            .to_connection("u2", "k9", "chat:c1", "x", &json!({}))
            .await
            .unwrap();
        let msg = next(&mut all).await;
        assert_eq!(msg.subject, "pub.user.u2");
        assert_eq!(
            DirectEvent::decode(msg.payload.as_ref()).unwrap().conn_id,
            "k9"
        );

        publisher
            .close_channel("u3", "chat:c1", "removed")
            .await
            .unwrap();
        let msg = next(&mut all).await;
        assert_eq!(msg.subject, "pub.user.u3");
        let ev = DirectEvent::decode(msg.payload.as_ref()).unwrap();
        assert!(matches!(ev.kind, Some(direct_event::Kind::Close(c)) if c.reason == "removed"));

        publisher.notice("chat", "membership", "c1").await.unwrap();
        let msg = next(&mut all).await;
        assert_eq!(msg.subject, "pub.svc.chat.membership");
        assert_eq!(msg.payload.as_ref(), b"c1");
    }
}
