//! The bus over core NATS (async-nats), for distributed mode.

use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::{Client, ConnectOptions, RequestErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{validate_subject, Bus, BusError, BusMessage, Headers, Subscription};

/// Messages buffered per subscription in the client before NATS counts us a
/// slow consumer and drops.
const SUBSCRIPTION_CAPACITY: usize = 65_536;

#[derive(Clone)]
pub struct NatsBus {
    client: Client,
}

impl NatsBus {
    /// Connects to `url`, naming the connection `name` (shown by
    /// `nats server report connections`). Fails fast when the server is
    /// unreachable at start-up; after that the client reconnects by itself.
    pub async fn connect(url: &str, name: &str) -> Result<Self, BusError> {
        let client = ConnectOptions::new()
            .name(name)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    async_nats::Event::SlowConsumer(sid) => {
                        metrics::counter!("quckchat_bus_dropped_total", "bus" => "nats")
                            .increment(1);
                        tracing::warn!(sid, "nats slow consumer: messages dropped");
                    }
                    other => tracing::info!(event = %other, "nats event"),
                }
            })
            .connect(url)
            .await
            .map_err(|e| BusError::Unavailable(format!("{url}: {e}")))?;
        // With retry_on_initial_connect, connect returns at once; wait (bounded)
        // for the first connection so a wrong URL is reported at start-up.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                return Err(BusError::Unavailable(format!("{url}: not reachable")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { client })
    }
}

fn to_header_map(headers: Headers) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(k.as_str(), v.as_str());
    }
    map
}

fn from_nats(msg: async_nats::Message) -> BusMessage {
    let headers = msg
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    BusMessage {
        subject: msg.subject.to_string(),
        reply: msg.reply.map(|r| r.to_string()),
        headers,
        payload: msg.payload,
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        validate_subject(subject, false)?;
        let subject = subject.to_owned();
        match (reply, headers.is_empty()) {
            (None, true) => self.client.publish(subject, payload).await,
            (None, false) => {
                self.client
                    .publish_with_headers(subject, to_header_map(headers), payload)
                    .await
            }
            (Some(r), true) => {
                self.client
                    .publish_with_reply(subject, r.to_owned(), payload)
                    .await
            }
            (Some(r), false) => {
                self.client
                    .publish_with_reply_and_headers(
                        subject,
                        r.to_owned(),
                        to_header_map(headers),
                        payload,
                    )
                    .await
            }
        }
        .map_err(unavailable)
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscription, BusError> {
        validate_subject(subject, true)?;
        let subscriber = match queue_group {
            Some(g) => {
                self.client
                    .queue_subscribe(subject.to_owned(), g.to_owned())
                    .await
            }
            None => self.client.subscribe(subject.to_owned()).await,
        }
        .map_err(unavailable)?;
        // Make sure the server has registered the interest before returning,
        // so a publish that follows is delivered.
        self.client.flush().await.map_err(unavailable)?;
        Ok(Subscription::new(subscriber.map(from_nats)))
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<BusMessage, BusError> {
        validate_subject(subject, false)?;
        let request = async_nats::Request::new()
            .payload(payload)
            .headers(to_header_map(headers))
            .timeout(Some(timeout));
        match self.client.send_request(subject.to_owned(), request).await {
            Ok(msg) => Ok(from_nats(msg)),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::NoResponders => BusError::NoResponders(subject.to_owned()),
                RequestErrorKind::TimedOut => BusError::TimedOut(subject.to_owned()),
                RequestErrorKind::Other => unavailable(e),
            }),
        }
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}
