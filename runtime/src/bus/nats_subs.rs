//! Exact-subject subscriptions over a NATS connection of their own, at a map
//! entry each.
//!
//! async-nats gives every subscription a tokio `mpsc` channel, and tokio
//! allocates that channel's first block of 32 message slots (32 × 184 B)
//! when it is made: ~5–6 KiB per subscription, kept while it lives. A
//! gateway subscribes once per connected user and once per topic its sockets
//! joined — tens of thousands of subscriptions, nearly all idle for hours —
//! so that block was most of a gateway's memory per socket. Here each exact
//! subject a process subscribes to without a queue group is a `SUB` on one
//! connection, an entry in one table, and a [`queue`] that holds no memory
//! while empty. Wildcards, queue groups, publishes and requests stay on
//! async-nats (few subscriptions, or none per socket).
//!
//! The connection speaks the core NATS client protocol (`CONNECT`, `SUB`,
//! `UNSUB`, `PING`/`PONG`; the server sends `MSG`/`HMSG`). A subscription is
//! ready when the server has answered a `PING` sent after its `SUB`: the
//! server handles a connection's commands in order, so from then on it
//! routes the subject here. When the connection drops, it is made again
//! (the same backoff as async-nats's; to the URL's server first, then to the
//! other servers of its cluster, which the server names in its `INFO`) and
//! every subscription of the table is sent again; as on async-nats, messages
//! published meanwhile are lost (at-most-once: gateways fill sequence gaps
//! from the services).
//!
//! Only plain `nats://` servers: a `tls://` or WebSocket URL, or a server
//! that requires TLS, keeps every subscription on async-nats
//! ([`NatsSubs::connect`] says which).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::{BusError, BusMessage, Handler, HandlerGuard, Headers, Subscription};
use crate::queue;

/// Messages a subscription holds for its reader before it drops (a slow
/// consumer, counted in `quckchat_bus_dropped_total`), as on async-nats.
const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// How long connecting, the server's greeting, and a subscription's
/// confirmation may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// How often the connection is checked with a `PING` of ours; two left
/// unanswered mean it is dead, and it is made again.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// Longest command line the server may send (its `max_control_line` default
/// is 4 KiB; a `MSG` line is a subject, a sid, a reply subject and a size).
const MAX_LINE: usize = 64 * 1024;

/// Largest message accepted when the server's greeting names no
/// `max_payload` (its default is 1 MiB).
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Credentials a NATS URL carries: `user:pass@`, or a token as `token@`
/// (percent-decoded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Credentials {
    pub user: Option<String>,
    pub pass: Option<String>,
    pub token: Option<String>,
}

impl Credentials {
    pub(super) fn of(url: &url::Url) -> Self {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .ok()
                .map(|s| s.into_owned())
                .filter(|s| !s.is_empty())
        };
        match (decode(url.username()), url.password().and_then(decode)) {
            (Some(token), None) => Self {
                token: Some(token),
                ..Self::default()
            },
            (user, pass) => Self {
                user,
                pass,
                token: None,
            },
        }
    }
}

/// A NATS URL as the `url` crate reads it; a bare `host[:port]` is
/// `nats://host[:port]`.
pub(super) fn parse_url(url: &str) -> Option<url::Url> {
    let url = url.trim();
    if url.contains("://") {
        url::Url::parse(url).ok()
    } else {
        url::Url::parse(&format!("nats://{url}")).ok()
    }
}

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Server {
    addr: String,
    credentials: Credentials,
}

impl Server {
    /// `None` for what this connection cannot speak (TLS, WebSocket).
    fn parse(url: &str) -> Option<Self> {
        let parsed = parse_url(url)?;
        if parsed.scheme() != "nats" {
            return None;
        }
        let host = parsed.host_str()?;
        let port = parsed.port().unwrap_or(4222);
        Some(Self {
            addr: format!("{host}:{port}"),
            credentials: Credentials::of(&parsed),
        })
    }
}

/// The subscriptions' connection; cheap to clone.
#[derive(Clone)]
pub(super) struct NatsSubs {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
}

struct Shared {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_sid: u64,
    subs: HashMap<u64, Entry>,
}

struct Entry {
    subject: Box<str>,
    sink: Sink,
}

/// Where a subscription's messages go.
enum Sink {
    /// A [`Subscription`]'s queue.
    Queue(queue::Sender<BusMessage>),
    /// A handler called at once ([`super::Bus::subscribe_with`]).
    Handler(Arc<dyn Handler>),
}

enum Command {
    /// Send the table's `SUB` for this sid (if it is still there).
    Subscribe(u64),
    Unsubscribe(u64),
    /// Answer once the server has handled everything sent before.
    Confirm(oneshot::Sender<()>),
}

impl NatsSubs {
    /// Connects to `url` as `name`; `Ok(None)` when this connection cannot
    /// serve the server (TLS, WebSocket): async-nats keeps every
    /// subscription then.
    pub(super) async fn connect(url: &str, name: &str) -> Result<Option<Self>, BusError> {
        let Some(server) = Server::parse(url) else {
            return Ok(None);
        };
        let connected = match handshake(&server.addr, &server, name).await {
            Ok(connected) => connected,
            Err(Handshake::Unsupported(why)) => {
                tracing::info!(%why, "nats: subscriptions stay on the main connection");
                return Ok(None);
            }
            Err(Handshake::Failed(e)) => {
                return Err(BusError::Unavailable(format!("{}: {e}", server.addr)))
            }
        };
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
        });
        let (commands, rx) = mpsc::unbounded_channel();
        let conn = Connection {
            known: vec![server.addr.clone()],
            server,
            name: name.to_owned(),
            shared: shared.clone(),
            commands: rx,
            waiting: VecDeque::new(),
            unconfirmed: Vec::new(),
            last_drop_logged: None,
        };
        tokio::spawn(conn.run(connected));
        Ok(Some(Self { shared, commands }))
    }

    /// Subscribes to the exact subject `subject`; returns once the server
    /// routes it here.
    pub(super) async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError> {
        let (tx, rx) = queue::bounded(SUBSCRIPTION_CAPACITY);
        let guard = self.add(subject, Sink::Queue(tx)).await?;
        Ok(Subscription::new(SubStream { rx, _guard: guard }))
    }

    /// [`super::Bus::subscribe_with`]: `handler` is called by the
    /// connection's task as each message is read.
    pub(super) async fn subscribe_with(
        &self,
        subject: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<HandlerGuard, BusError> {
        let guard = self.add(subject, Sink::Handler(handler)).await?;
        Ok(HandlerGuard::new(guard))
    }

    /// Adds a subscription to the table and sends its `SUB`; returns once
    /// the server confirmed it. Dropping the guard removes it.
    async fn add(&self, subject: &str, sink: Sink) -> Result<Unsubscribe, BusError> {
        let sid = {
            let mut table = lock(&self.shared.table);
            table.next_sid += 1;
            let sid = table.next_sid;
            table.subs.insert(
                sid,
                Entry {
                    subject: subject.into(),
                    sink,
                },
            );
            sid
        };
        // From here the guard unsubscribes, whatever happens below.
        let guard = Unsubscribe {
            shared: Arc::downgrade(&self.shared),
            commands: self.commands.clone(),
            sid,
        };
        let (confirmed, wait) = oneshot::channel();
        let gone = || BusError::Unavailable("nats subscriptions' connection ended".into());
        self.commands
            .send(Command::Subscribe(sid))
            .map_err(|_| gone())?;
        self.commands
            .send(Command::Confirm(confirmed))
            .map_err(|_| gone())?;
        match tokio::time::timeout(TIMEOUT, wait).await {
            Ok(Ok(())) => Ok(guard),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(BusError::Unavailable(format!(
                "nats did not confirm the subscription to {subject} within {TIMEOUT:?}"
            ))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A subscription's messages; dropping it unsubscribes.
struct SubStream {
    rx: queue::Receiver<BusMessage>,
    _guard: Unsubscribe,
}

impl Stream for SubStream {
    type Item = BusMessage;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<BusMessage>> {
        let polled = self.rx.poll_recv(cx);
        if polled.is_pending() {
            // About to wait, perhaps for hours: no buffer kept meanwhile.
            self.rx.release_if_empty();
        }
        polled
    }
}

struct Unsubscribe {
    shared: std::sync::Weak<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    sid: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared.table).subs.remove(&self.sid);
        }
        // The connection may be gone: then so is the subscription.
        let _ = self.commands.send(Command::Unsubscribe(self.sid));
    }
}

enum Handshake {
    /// The server needs what this connection does not speak.
    Unsupported(String),
    Failed(String),
}

/// A connection ready for subscriptions.
struct Connected {
    stream: TcpStream,
    /// The server's largest message.
    max_payload: usize,
    /// The other servers of its cluster (`connect_urls`), `host:port`.
    cluster: Vec<String>,
    /// What the server sent after confirming the handshake, in the same
    /// read (an `INFO` as a cluster's routes form, a `PING`).
    unread: BytesMut,
}

/// Connects to `addr`, reads the server's `INFO`, sends `CONNECT` with the
/// credentials of `server` and waits for the `PONG` that confirms it.
async fn handshake(addr: &str, server: &Server, name: &str) -> Result<Connected, Handshake> {
    let failed = |e: &dyn std::fmt::Display| Handshake::Failed(e.to_string());
    let work = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| failed(&e))?;
        stream.set_nodelay(true).map_err(|e| failed(&e))?;
        let mut buf = BytesMut::with_capacity(4096);
        let info = loop {
            if let Some(line) = take_line(&mut buf).map_err(|e| failed(&e))? {
                break line;
            }
            if stream.read_buf(&mut buf).await.map_err(|e| failed(&e))? == 0 {
                return Err(failed(&"closed before its greeting"));
            }
        };
        let info = std::str::from_utf8(&info)
            .ok()
            .and_then(|l| l.strip_prefix("INFO "))
            .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
            .ok_or_else(|| failed(&"no INFO greeting"))?;
        if info["tls_required"].as_bool() == Some(true) {
            return Err(Handshake::Unsupported("the server requires TLS".into()));
        }
        let credentials = &server.credentials;
        if info["nonce"].is_string() && credentials.user.is_none() && credentials.token.is_none() {
            return Err(Handshake::Unsupported(
                "the server asks for an NKey signature".into(),
            ));
        }
        let max_payload = info["max_payload"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_MAX_PAYLOAD);
        let cluster = connect_urls(&info);
        let mut connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "tls_required": false,
            "name": format!("{name} (subscriptions)"),
            "lang": "rust",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "headers": true,
            "no_responders": true,
        });
        if let Some(user) = &credentials.user {
            connect["user"] = user.as_str().into();
        }
        if let Some(pass) = &credentials.pass {
            connect["pass"] = pass.as_str().into();
        }
        if let Some(token) = &credentials.token {
            connect["auth_token"] = token.as_str().into();
        }
        stream
            .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
            .await
            .map_err(|e| failed(&e))?;
        loop {
            match take_line(&mut buf).map_err(|e| failed(&e))? {
                Some(line) if line.as_ref() == b"PONG" => break,
                Some(line) if line.starts_with(b"-ERR") => {
                    return Err(failed(&String::from_utf8_lossy(&line)));
                }
                Some(line) if line.as_ref() == b"PING" => {
                    stream
                        .write_all(b"PONG\r\n")
                        .await
                        .map_err(|e| failed(&e))?;
                }
                // +OK, a second INFO.
                Some(_) => {}
                None => {
                    if stream.read_buf(&mut buf).await.map_err(|e| failed(&e))? == 0 {
                        return Err(failed(&"closed during the handshake"));
                    }
                }
            }
        }
        Ok(Connected {
            stream,
            max_payload,
            cluster,
            unread: buf,
        })
    };
    match tokio::time::timeout(TIMEOUT, work).await {
        Ok(result) => result,
        Err(_) => Err(Handshake::Failed(format!(
            "no handshake within {TIMEOUT:?}"
        ))),
    }
}

/// The servers an `INFO` names (`connect_urls`: `host:port`).
fn connect_urls(info: &serde_json::Value) -> Vec<String> {
    info["connect_urls"]
        .as_array()
        .map(|urls| {
            urls.iter()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A protocol line without its `\r\n`, if a whole one is buffered.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, String> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = buf.split_to(end).freeze();
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(format!("a protocol line over {MAX_LINE} bytes")),
        None => Ok(None),
    }
}

/// One thing the server sent.
#[derive(Debug)]
enum Op {
    Msg {
        sid: u64,
        message: BusMessage,
    },
    Ping,
    Pong,
    Err(String),
    /// The servers of the cluster, as an `INFO` sent later names them.
    Cluster(Vec<String>),
    /// `+OK`, an `INFO` naming no servers: nothing to do.
    Other,
}

/// The next whole operation in `buf`, consumed; `None` until one is
/// buffered whole.
fn parse_op(buf: &mut BytesMut, max_payload: usize) -> Result<Option<Op>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_LINE {
            return Err(format!("a protocol line over {MAX_LINE} bytes"));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "a line not in UTF-8".to_owned())?;
    let mut words = line.split_ascii_whitespace();
    let verb = words.next().unwrap_or_default().to_ascii_uppercase();
    let (header_len, total_len, subject, sid, reply) = match verb.as_str() {
        "MSG" | "HMSG" => {
            let args: Vec<&str> = words.collect();
            let bad = || format!("malformed {verb} line: {line:?}");
            // MSG <subject> <sid> [reply] <size>
            // HMSG <subject> <sid> [reply] <header size> <total size>
            let sizes = if verb == "MSG" { 1 } else { 2 };
            let (reply, sizes) = match args.len().checked_sub(2 + sizes) {
                Some(0) => (None, &args[2..]),
                Some(1) => (Some(args[2]), &args[3..]),
                _ => return Err(bad()),
            };
            let sizes: Vec<usize> = sizes
                .iter()
                .map(|s| s.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?;
            let (header_len, total_len) = match sizes[..] {
                [total] => (0, total),
                [header, total] if header <= total => (header, total),
                _ => return Err(bad()),
            };
            let sid = args[1].parse::<u64>().map_err(|_| bad())?;
            (
                header_len,
                total_len,
                args[0].to_owned(),
                sid,
                reply.map(str::to_owned),
            )
        }
        "PING" => {
            buf.advance(end + 2);
            return Ok(Some(Op::Ping));
        }
        "PONG" => {
            buf.advance(end + 2);
            return Ok(Some(Op::Pong));
        }
        "-ERR" => {
            let message = line[4..].trim().trim_matches('\'').to_owned();
            buf.advance(end + 2);
            return Ok(Some(Op::Err(message)));
        }
        "INFO" => {
            let cluster = serde_json::from_str::<serde_json::Value>(line[4..].trim())
                .map(|info| connect_urls(&info))
                .unwrap_or_default();
            buf.advance(end + 2);
            return Ok(Some(match cluster.is_empty() {
                true => Op::Other,
                false => Op::Cluster(cluster),
            }));
        }
        "+OK" => {
            buf.advance(end + 2);
            return Ok(Some(Op::Other));
        }
        _ => return Err(format!("unknown operation {line:?}")),
    };
    // The server sends nothing over its own limit; twice that is refused
    // before it is buffered.
    if total_len > max_payload.saturating_mul(2) {
        return Err(format!(
            "a message of {total_len} bytes, over the server's limit"
        ));
    }
    if buf.len() < end + 2 + total_len + 2 {
        buf.reserve(end + 2 + total_len + 2 - buf.len());
        return Ok(None);
    }
    buf.advance(end + 2);
    let mut body = buf.split_to(total_len).freeze();
    if &buf[..2] != b"\r\n" {
        return Err("a message not ended by CRLF".into());
    }
    buf.advance(2);
    let headers = parse_headers(&body.split_to(header_len))?;
    Ok(Some(Op::Msg {
        sid,
        message: BusMessage {
            subject,
            reply,
            headers,
            payload: body,
        },
    }))
}

/// `NATS/1.0[ status]\r\nName: value\r\n…\r\n` (empty for `MSG`).
fn parse_headers(block: &[u8]) -> Result<Headers, String> {
    if block.is_empty() {
        return Ok(Headers::new());
    }
    let text = std::str::from_utf8(block).map_err(|_| "headers not in UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    if !lines.next().unwrap_or_default().starts_with("NATS/1.0") {
        return Err("headers without their NATS/1.0 line".into());
    }
    Ok(lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

/// The task that owns the connection.
struct Connection {
    server: Server,
    /// Where to connect: the URL's server first, then those its cluster
    /// named (as async-nats fails over to them).
    known: Vec<String>,
    name: String,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Confirmations owed, one group per `PING` sent (empty for a
    /// keepalive), oldest first.
    waiting: VecDeque<Vec<oneshot::Sender<()>>>,
    /// Confirmations asked since the last `PING`.
    unconfirmed: Vec<oneshot::Sender<()>>,
    /// When a dropped message was last logged (drops are counted always).
    last_drop_logged: Option<tokio::time::Instant>,
}

/// Why a connection ended.
enum Ended {
    /// Every handle and subscription is gone: nothing to serve.
    Unused,
    Lost(String),
}

impl Connection {
    async fn run(mut self, first: Connected) {
        let mut connected = Some(first);
        let mut attempts = 0usize;
        loop {
            let addr = self.known[attempts % self.known.len()].clone();
            let mut connected = match connected.take() {
                Some(c) => c,
                None => match handshake(&addr, &self.server, &self.name).await {
                    Ok(c) => c,
                    Err(Handshake::Failed(e) | Handshake::Unsupported(e)) => {
                        attempts += 1;
                        if attempts == 1 {
                            tracing::warn!(%addr, error = %e, "nats subscriptions: reconnecting");
                        }
                        tokio::time::sleep(super::nats::reconnect_delay(attempts)).await;
                        continue;
                    }
                },
            };
            if attempts > 0 {
                tracing::info!(%addr, "nats subscriptions: reconnected");
            }
            attempts = 0;
            self.learn(std::mem::take(&mut connected.cluster));
            match self.serve(connected).await {
                Ended::Unused => return,
                Ended::Lost(why) => {
                    tracing::warn!(%addr, %why, "nats subscriptions: connection lost");
                    // What waited on the old connection is confirmed on the
                    // next, after every subscription is sent again.
                    for group in self.waiting.drain(..) {
                        self.unconfirmed.extend(group);
                    }
                }
            }
        }
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, connected: Connected) -> Ended {
        let Connected {
            stream,
            max_payload,
            unread: mut buf,
            ..
        } = connected;
        let (mut reader, mut writer) = stream.into_split();
        let mut out = Vec::with_capacity(4096);
        // Every subscription of the table, again (none the first time).
        {
            let table = lock(&self.shared.table);
            for (sid, entry) in &table.subs {
                push_sub(&mut out, &entry.subject, *sid);
            }
        }
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.tick().await;
        let mut unanswered = 0u32;
        loop {
            // What is buffered (from the handshake's last read too).
            loop {
                match parse_op(&mut buf, max_payload) {
                    Ok(None) => break,
                    Ok(Some(op)) => {
                        if let Some(ended) = self.on_op(op, &mut out, &mut unanswered) {
                            return ended;
                        }
                    }
                    Err(e) => return Ended::Lost(format!("protocol error: {e}")),
                }
            }
            if !self.unconfirmed.is_empty() {
                out.extend_from_slice(b"PING\r\n");
                self.waiting
                    .push_back(std::mem::take(&mut self.unconfirmed));
            }
            if !out.is_empty() {
                if let Err(e) = writer.write_all(&out).await {
                    return Ended::Lost(e.to_string());
                }
                out.clear();
                out.shrink_to(4096);
            }
            tokio::select! {
                read = reader.read_buf(&mut buf) => match read {
                    Ok(0) => return Ended::Lost("closed by the server".into()),
                    Ok(_) => {}
                    Err(e) => return Ended::Lost(e.to_string()),
                },
                command = self.commands.recv() => {
                    let Some(command) = command else { return Ended::Unused };
                    self.on_command(command, &mut out);
                    // Everything queued now goes out in one write.
                    while let Ok(command) = self.commands.try_recv() {
                        self.on_command(command, &mut out);
                    }
                }
                _ = keepalive.tick() => {
                    if unanswered >= 2 {
                        return Ended::Lost("two keepalive PINGs unanswered".into());
                    }
                    unanswered += 1;
                    out.extend_from_slice(b"PING\r\n");
                    self.waiting.push_back(Vec::new());
                }
            }
            if buf.is_empty() && buf.capacity() > 64 * 1024 {
                buf = BytesMut::with_capacity(4096);
            }
        }
    }

    /// Hands a message to its subscription: queued, or to its handler.
    fn dispatch(&mut self, sid: u64, message: BusMessage) {
        let table = lock(&self.shared.table);
        // Unknown: unsubscribed since (the server may still have sent).
        let Some(entry) = table.subs.get(&sid) else {
            return;
        };
        let tx = match &entry.sink {
            Sink::Queue(tx) => tx,
            Sink::Handler(handler) => {
                // Called without the table's lock: the handler may drop a
                // subscription.
                let handler = handler.clone();
                drop(table);
                return handler.on_message(message);
            }
        };
        if let Err(queue::TrySendError::Full(m)) = tx.try_send(message) {
            metrics::counter!("quckchat_bus_dropped_total", "bus" => "nats").increment(1);
            let now = tokio::time::Instant::now();
            if self
                .last_drop_logged
                .is_none_or(|t| now - t > Duration::from_secs(1))
            {
                self.last_drop_logged = Some(now);
                tracing::warn!(subject = %m.subject, "nats slow consumer: messages dropped");
            }
        }
    }

    /// Remembers servers of the cluster to fail over to.
    fn learn(&mut self, servers: Vec<String>) {
        for server in servers {
            if !self.known.contains(&server) {
                self.known.push(server);
            }
        }
    }

    fn on_command(&mut self, command: Command, out: &mut Vec<u8>) {
        match command {
            Command::Subscribe(sid) => {
                if let Some(entry) = lock(&self.shared.table).subs.get(&sid) {
                    push_sub(out, &entry.subject, sid);
                }
            }
            Command::Unsubscribe(sid) => {
                out.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes());
            }
            Command::Confirm(tx) => self.unconfirmed.push(tx),
        }
    }

    fn on_op(&mut self, op: Op, out: &mut Vec<u8>, unanswered: &mut u32) -> Option<Ended> {
        match op {
            Op::Msg { sid, message } => self.dispatch(sid, message),
            Op::Ping => out.extend_from_slice(b"PONG\r\n"),
            Op::Pong => {
                *unanswered = 0;
                for tx in self.waiting.pop_front().unwrap_or_default() {
                    let _ = tx.send(());
                }
            }
            Op::Err(e) => {
                // The server closes the connection after most errors
                // (authorization, a parse error); what it keeps open is
                // logged only.
                tracing::warn!(error = %e, "nats subscriptions: server error");
                if e.to_ascii_lowercase().contains("authorization") {
                    return Some(Ended::Lost(e));
                }
            }
            Op::Cluster(servers) => self.learn(servers),
            Op::Other => {}
        }
        None
    }
}

fn push_sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(subject.as_bytes());
    out.extend_from_slice(format!(" {sid}\r\n").as_bytes());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Op>, String> {
        let mut buf = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = parse_op(&mut buf, 1024)? {
            ops.push(op);
        }
        assert!(buf.is_empty(), "left unparsed: {buf:?}");
        Ok(ops)
    }

    #[test]
    fn urls_name_the_server_and_its_credentials() {
        let s = Server::parse("nats://127.0.0.1:4222").unwrap();
        assert_eq!(s.addr, "127.0.0.1:4222");
        assert_eq!(s.credentials, Credentials::default());
        assert_eq!(Server::parse("localhost").unwrap().addr, "localhost:4222");
        assert_eq!(
            Server::parse("10.0.0.1:5222").unwrap().addr,
            "10.0.0.1:5222"
        );
        let s = Server::parse("nats://al%40x:p%3Ass@nats.svc:4223").unwrap();
        assert_eq!(s.addr, "nats.svc:4223");
        assert_eq!(s.credentials.user.as_deref(), Some("al@x"));
        assert_eq!(s.credentials.pass.as_deref(), Some("p:ss"));
        let s = Server::parse("nats://s3cret@nats.svc").unwrap();
        let c = s.credentials;
        assert_eq!((c.user, c.token.as_deref()), (None, Some("s3cret")));
        let tls = parse_url("tls://u:p@nats.svc:4222").unwrap();
        assert_eq!(Credentials::of(&tls).pass.as_deref(), Some("p"));
        assert_eq!(
            Server::parse("nats://[::1]:4222").unwrap().addr,
            "[::1]:4222"
        );
        assert_eq!(Server::parse("tls://nats.svc:4222"), None);
        assert_eq!(Server::parse("ws://nats.svc:8080"), None);
    }

    #[test]
    fn messages_with_and_without_reply_and_headers_are_parsed() {
        let ops = parse_all(
            b"MSG a.b 7 5\r\nhello\r\n\
              MSG a.c 8 _INBOX.x 0\r\n\r\n\
              HMSG a.d 9 20 25\r\nNATS/1.0\r\nK: v 1\r\n\r\nworld\r\n\
              PING\r\nPONG\r\n+OK\r\nINFO {}\r\n-ERR 'Stale Connection'\r\n\
              INFO {\"connect_urls\":[\"10.0.0.2:4222\"]}\r\n",
        )
        .unwrap();
        let msg =
            |subject: &str, reply: Option<&str>, headers: Headers, payload: &str| BusMessage {
                subject: subject.into(),
                reply: reply.map(Into::into),
                headers,
                payload: Bytes::copy_from_slice(payload.as_bytes()),
            };
        let expected = vec![
            Op::Msg {
                sid: 7,
                message: msg("a.b", None, vec![], "hello"),
            },
            Op::Msg {
                sid: 8,
                message: msg("a.c", Some("_INBOX.x"), vec![], ""),
            },
            Op::Msg {
                sid: 9,
                message: msg("a.d", None, vec![("K".into(), "v 1".into())], "world"),
            },
            Op::Ping,
            Op::Pong,
            Op::Other,
            Op::Other,
            Op::Err("Stale Connection".into()),
            Op::Cluster(vec!["10.0.0.2:4222".into()]),
        ];
        assert_eq!(ops.len(), expected.len());
        for (got, want) in ops.iter().zip(&expected) {
            match (got, want) {
                (Op::Msg { sid: a, message: m }, Op::Msg { sid: b, message: n }) => {
                    assert_eq!(a, b);
                    assert_eq!(
                        (&m.subject, &m.reply, &m.headers, &m.payload),
                        (&n.subject, &n.reply, &n.headers, &n.payload)
                    );
                }
                _ => assert_eq!(format!("{got:?}"), format!("{want:?}")),
            }
        }
    }

    #[test]
    fn a_message_split_across_reads_waits_for_its_end() {
        let whole = b"MSG a.b 1 10\r\n0123456789\r\n";
        for cut in 1..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert!(parse_op(&mut buf, 1024).unwrap().is_none(), "cut at {cut}");
            buf.extend_from_slice(&whole[cut..]);
            match parse_op(&mut buf, 1024).unwrap() {
                Some(Op::Msg { sid: 1, message }) => {
                    assert_eq!(&message.payload[..], b"0123456789")
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
            assert!(buf.is_empty());
        }
    }

    /// A server that pings during the handshake and sends more right after
    /// its PONG, in the same write: the ping is answered and what follows
    /// is kept for the connection, not taken for an error.
    #[tokio::test]
    async fn the_handshake_answers_a_ping_and_keeps_what_follows_its_pong() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"INFO {\"max_payload\":2048}\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            while !got.ends_with(b"PING\r\n") {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before CONNECT and PING");
                got.extend_from_slice(&chunk[..n]);
            }
            assert!(got.starts_with(b"CONNECT {"));
            s.write_all(b"PING\r\n").await.unwrap();
            let mut pong = [0u8; 6];
            s.read_exact(&mut pong).await.unwrap();
            s.write_all(b"PONG\r\nINFO {\"connect_urls\":[\"10.0.0.2:4222\"]}\r\n")
                .await
                .unwrap();
            pong
        });
        let target = Server::parse(&addr).unwrap();
        let connected = match handshake(&addr, &target, "t").await {
            Ok(c) => c,
            Err(Handshake::Failed(e) | Handshake::Unsupported(e)) => panic!("{e}"),
        };
        assert_eq!(&server.await.unwrap(), b"PONG\r\n");
        assert_eq!(connected.max_payload, 2048);
        let mut unread = connected.unread;
        match parse_op(&mut unread, 2048).unwrap() {
            Some(Op::Cluster(servers)) => assert_eq!(servers, ["10.0.0.2:4222"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_input_is_a_protocol_error() {
        for bad in [
            &b"MSG a.b x 1\r\nx\r\n"[..],
            b"MSG a.b 1\r\n",
            b"MSG a.b 1 3\r\nabcde\r\n",
            b"HMSG a.b 1 9 3\r\nabc\r\n",
            b"HMSG a.b 1 3 3\r\nabc\r\n",
            b"WHAT\r\n",
            b"MSG a.b 1 99999\r\n",
        ] {
            assert!(parse_all(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'x'; MAX_LINE + 1];
        assert!(parse_all(&long).is_err());
    }
}
