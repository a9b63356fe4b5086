//! The bus over core NATS (async-nats), for distributed mode.

use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::{Client, ConnectOptions, RequestErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::nats_subs::{parse_url, Credentials, NatsSubs};
use super::{
    count_request_timeout, feed, is_pattern, validate_subject, Bus, BusError, BusMessage, Handler,
    HandlerGuard, Headers, Subscription,
};

/// Messages buffered per subscription in the client before NATS counts us a
/// slow consumer and drops.
const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// Longest wait between reconnect attempts: a process is back on the bus
/// within this of NATS returning.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// Wait before reconnect attempt `attempts` (1, 2, …): 50 ms, 100 ms, …
/// up to [`MAX_RECONNECT_DELAY`]. (async-nats's default backs off to
/// seconds: a 5 s outage cost 8 s.)
pub(super) fn reconnect_delay(attempts: usize) -> Duration {
    let ms = u64::try_from(attempts)
        .unwrap_or(u64::MAX)
        .saturating_mul(50);
    Duration::from_millis(ms).min(MAX_RECONNECT_DELAY)
}

#[derive(Clone)]
pub struct NatsBus {
    client: Client,
    /// Exact subjects without a queue group (a gateway's users and topics:
    /// thousands) are subscribed on a connection of their own, at a table
    /// entry each ([`super::nats_subs`]); `None` when that connection cannot
    /// speak to the server (TLS, WebSocket) and async-nats serves them all.
    subs: Option<NatsSubs>,
}

impl NatsBus {
    /// Connects to `url`, naming the connection `name` (shown by
    /// `nats server report connections`). Fails fast when the server is
    /// unreachable at start-up; after that the client reconnects by itself.
    pub async fn connect(url: &str, name: &str) -> Result<Self, BusError> {
        // async-nats reads no credentials from the URL: they are given apart.
        let credentials = parse_url(url)
            .map(|u| Credentials::of(&u))
            .unwrap_or_default();
        let mut options = ConnectOptions::new();
        if let Some(token) = credentials.token {
            options = options.token(token);
        } else if let Some(user) = credentials.user {
            options = options.user_and_password(user, credentials.pass.unwrap_or_default());
        }
        let client = options
            .name(name)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
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
        let subs = NatsSubs::connect(url, name).await?;
        Ok(Self { client, subs })
    }

    /// The NATS client, for what the [`crate::bus::Bus`] trait does not
    /// cover (JetStream).
    pub fn client(&self) -> &Client {
        &self.client
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
        let exact = !is_pattern(subject);
        if let (Some(subs), None, true) = (&self.subs, queue_group, exact) {
            return subs.subscribe(subject).await;
        }
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

    async fn subscribe_with(
        &self,
        subject: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<HandlerGuard, BusError> {
        validate_subject(subject, false)?;
        match &self.subs {
            Some(subs) => subs.subscribe_with(subject, handler).await,
            None => Ok(feed(self.subscribe(subject, None).await?, handler)),
        }
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<BusMessage, BusError> {
        validate_subject(subject, false)?;
        // While disconnected the client would buffer the request and wait out
        // its timeout; the caller is better told at once.
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        let request = async_nats::Request::new()
            .payload(payload)
            .headers(to_header_map(headers))
            .timeout(Some(timeout));
        match self.client.send_request(subject.to_owned(), request).await {
            Ok(msg) => Ok(from_nats(msg)),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::NoResponders => BusError::NoResponders(subject.to_owned()),
                RequestErrorKind::TimedOut => {
                    count_request_timeout("nats", subject);
                    BusError::TimedOut(subject.to_owned())
                }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use super::*;

    #[test]
    fn reconnects_are_attempted_often() {
        assert_eq!(reconnect_delay(1), Duration::from_millis(50));
        assert_eq!(reconnect_delay(4), Duration::from_millis(200));
        assert_eq!(reconnect_delay(1000), MAX_RECONNECT_DELAY);
        assert_eq!(reconnect_delay(usize::MAX), MAX_RECONNECT_DELAY);
    }

    /// A test's own nats-server, stopped when dropped: also when the test
    /// fails half-way.
    struct NatsServer(Child);

    impl NatsServer {
        fn stop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    impl Drop for NatsServer {
        fn drop(&mut self) {
            self.stop();
        }
    }

    /// A nats-server of this test's own on a free port (`NATS_SERVER_BIN`,
    /// written by scripts/deps.sh, or `nats-server` on the PATH).
    fn nats_server(port: u16) -> NatsServer {
        nats_server_with(port, &[])
    }

    fn nats_server_with(port: u16, args: &[&str]) -> NatsServer {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        NatsServer(
            Command::new(&bin)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{bin}: {e} (scripts/deps.sh writes NATS_SERVER_BIN)")),
        )
    }

    /// Connects once the test's server is up (within 10 s).
    async fn connect_when_up(url: &str, name: &str) -> NatsBus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match NatsBus::connect(url, name).await {
                Ok(bus) => return bus,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < within, "{what} not within {within:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    }

    #[tokio::test]
    async fn subscriptions_use_the_credentials_of_the_url() {
        let port = free_port();
        let mut server = nats_server_with(port, &["--user", "qc", "--pass", "p@ss:w"]);
        let url = format!("nats://qc:p%40ss%3Aw@127.0.0.1:{port}");
        let bus = connect_when_up(&url, "auth-test").await;
        assert!(bus.subs.is_some(), "exact subjects on their own connection");
        let mut sub = bus.subscribe("t.user.u1", None).await.unwrap();
        bus.publish("t.user.u1", None, Vec::new(), Bytes::from_static(b"hi"))
            .await
            .unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(msg.payload.as_ref(), b"hi");
        // A wrong password is refused with the server's reason.
        let wrong = format!("nats://qc:nope@127.0.0.1:{port}");
        let err = NatsSubs::connect(&wrong, "auth-test").await.err().unwrap();
        assert!(
            err.to_string()
                .to_ascii_lowercase()
                .contains("authorization"),
            "{err}"
        );
        server.stop();
    }

    /// Two clustered servers: the subscriptions' connection learns the
    /// second from the first and moves there when the first dies.
    #[tokio::test]
    async fn subscriptions_fail_over_to_another_server_of_the_cluster() {
        let (a, b, route_a, route_b) = (free_port(), free_port(), free_port(), free_port());
        let cluster = |own: u16, other: u16| {
            [
                "--cluster_name".to_owned(),
                "qc".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{own}"),
                "--routes".to_owned(),
                format!("nats://127.0.0.1:{other}"),
            ]
        };
        let args_a = cluster(route_a, route_b);
        let args_b = cluster(route_b, route_a);
        let mut server_a =
            nats_server_with(a, &args_a.iter().map(String::as_str).collect::<Vec<_>>());
        let mut server_b =
            nats_server_with(b, &args_b.iter().map(String::as_str).collect::<Vec<_>>());
        let on_a = connect_when_up(&format!("nats://127.0.0.1:{a}"), "on-a").await;
        let on_b = connect_when_up(&format!("nats://127.0.0.1:{b}"), "on-b").await;
        let mut sub = on_a.subscribe("t.user.u1", None).await.unwrap();
        // Published on B, received through A: the route is up.
        async fn receive(from: &NatsBus, sub: &mut Subscription, what: &str) {
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    from.publish("t.user.u1", None, Vec::new(), Bytes::from_static(b"x"))
                        .await
                        .unwrap();
                    if let Ok(Some(_)) =
                        tokio::time::timeout(Duration::from_millis(100), sub.next()).await
                    {
                        break;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("nothing received {what}"));
        }
        receive(&on_b, &mut sub, "through the route").await;
        server_a.stop();
        receive(&on_b, &mut sub, "after its server died").await;
        server_b.stop();
    }

    #[tokio::test]
    async fn an_outage_fails_requests_at_once_and_ends_within_a_second_of_nats_returning() {
        let port = free_port();
        let url = format!("nats://127.0.0.1:{port}");
        let mut server = nats_server(port);
        let bus = connect_when_up(&url, "outage-test").await;
        // An exact subject (the subscriptions' own connection) and a
        // wildcard (async-nats), both made before the outage.
        let mut exact = bus.subscribe("t.user.u1", None).await.unwrap();
        let mut wild = bus.subscribe("t.topic.*", None).await.unwrap();
        server.stop();
        until("the client noticing", Duration::from_secs(10), || {
            !bus.is_connected()
        })
        .await;
        let started = Instant::now();
        let err = bus
            .request("t.cmd.x", Vec::new(), Bytes::new(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, BusError::Unavailable(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        // Down a while (several backoff steps), then back on the same port.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut server = nats_server(port);
        let back = until("reconnecting", Duration::from_secs(10), || {
            bus.is_connected()
        })
        .await;
        assert!(
            back < Duration::from_millis(1500),
            "reconnected {back:?} after NATS returned"
        );
        let mut sub = bus.subscribe("t.cmd.x", Some("x")).await.unwrap();
        let responder = {
            let bus = bus.clone();
            tokio::spawn(async move {
                let msg = sub.next().await.unwrap();
                super::super::respond(&bus, &msg, Bytes::from_static(b"pong"))
                    .await
                    .unwrap();
            })
        };
        let reply = bus
            .request("t.cmd.x", Vec::new(), Bytes::new(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(reply.payload.as_ref(), b"pong");
        responder.await.unwrap();
        // Both subscriptions are back (messages published while the
        // subscriptions' connection was still away are lost, at most once).
        for (sub, subject) in [(&mut exact, "t.user.u1"), (&mut wild, "t.topic.x")] {
            let got = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    bus.publish(subject, None, Vec::new(), Bytes::from_static(b"back"))
                        .await
                        .unwrap();
                    if let Ok(Some(msg)) =
                        tokio::time::timeout(Duration::from_millis(100), sub.next()).await
                    {
                        break msg;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{subject}: no message after NATS returned"));
            assert_eq!(got.subject, subject);
        }
        server.stop();
    }
}
