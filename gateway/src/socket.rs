//! One client socket: Phoenix channel semantics on top of the bus.
//!
//! A single task owns the socket. It reads frames, answers heartbeats, keeps
//! the socket's channels (joined topics), forwards pushes to the owning
//! service as bus requests, and writes replies and fan-out deliveries. Pushes
//! on one channel are handled one at a time, in order, as a Phoenix channel
//! process would; different channels proceed concurrently.
//!
//! Written against `Stream + Sink` of WebSocket messages so the protocol is
//! tested without a network.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Sink, SinkExt, Stream, StreamExt};
use quckchat_proto::bus::{command_reply, direct_event, ClientCommand, CommandReply};
use serde_json::value::RawValue;
use tokio::time::{sleep_until, Instant, Sleep};

use crate::frame::{self, FrameError, InFrame, Vsn};
use crate::hub::{json_payload, Delivery, Item, SubjectKind, Subscriber};
use crate::limits::{ControlBudget, PushBudget, Strikes};
use crate::routing::{self, Route};
use crate::{ws, Shared};
use quckchat_runtime::errors::ClientError;
use quckchat_runtime::queue;

/// Close codes (RFC 6455 and IANA registry).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    /// A WebSocket protocol error (reserved bits, fragmented control frame,
    /// unmasked client frame, ...).
    pub const PROTOCOL: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// How long a server-initiated close waits for the client's close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// Most queued deliveries written after the one that woke the socket before
/// it flushes.
const DELIVERY_BATCH: usize = 64;

/// The close a read error calls for: a message over the size limit (1009), a
/// WebSocket protocol error (1002) and a text frame that is not UTF-8 (1007)
/// are answered with a close frame; anything else (the peer vanished, I/O)
/// ends the socket without one.
fn read_error_close(err: &ws::Error) -> Option<Close> {
    match err {
        ws::Error::TooBig { .. } => {
            metrics::counter!("quckchat_gateway_oversized_frames_total").increment(1);
            Some(Close(close_code::TOO_BIG, "message too big"))
        }
        ws::Error::Protocol(_) => {
            metrics::counter!("quckchat_gateway_protocol_errors_total", "kind" => "protocol")
                .increment(1);
            Some(Close(close_code::PROTOCOL, "protocol error"))
        }
        ws::Error::Utf8 => {
            metrics::counter!("quckchat_gateway_protocol_errors_total", "kind" => "utf8")
                .increment(1);
            Some(Close(close_code::INVALID_DATA, "invalid UTF-8"))
        }
        ws::Error::Reset | ws::Error::Closed | ws::Error::Io(_) => None,
    }
}

/// Who is on the socket.
#[derive(Debug, Clone)]
pub struct Peer {
    pub conn_id: Arc<str>,
    pub user_id: Arc<str>,
    pub device_id: String,
    pub vsn: Vsn,
}

/// Flags the gateway raises on a socket's queue
/// ([`queue::Sender::signal`]): a socket keeps no timer or future of its own
/// for them.
pub(crate) mod signal {
    /// The gateway's sweep found no frame from the client for the idle
    /// timeout (the socket checks again: one may have come since).
    pub const IDLE: u8 = 1;
    /// The server is shutting down: close within the drain window.
    pub const DRAIN: u8 = 2;
}

/// A socket as the gateway's table of live sockets holds it, shared with
/// the socket's task.
pub(crate) struct Live {
    pub peer: Peer,
    /// The socket's queue: its subscriptions hold clones, the gateway
    /// signals on it. The socket holds it too, so the queue ends only when
    /// cut off ([`queue::Sender::overflow`]).
    pub tx: queue::Sender<Delivery>,
    /// When the client's last frame came, on the gateway's clock
    /// ([`Shared::clock_ms`]).
    last_read_ms: AtomicU64,
}

impl Live {
    /// Milliseconds (of the gateway's clock) since the client's last frame.
    pub fn idle_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_read_ms.load(Ordering::Relaxed))
    }

    fn read_at(&self, now_ms: u64) {
        self.last_read_ms.store(now_ms, Ordering::Relaxed);
    }
}

/// The socket's draining, once the server shuts down (boxed: most sockets
/// never need it).
struct Draining {
    started: Instant,
    timer: Pin<Box<Sleep>>,
    /// The socket's close time came with pushes in flight: it reads nothing
    /// more and closes once they are answered (their messages may be
    /// stored: the client must get the ack), or at the end of the drain
    /// window.
    closing: bool,
}

struct Channel {
    topic: Box<str>,
    join_ref: Option<Box<str>>,
    sub_id: u64,
    route: &'static Route,
    joined: bool,
    /// What waits on the channel; boxed, and only while something does.
    backlog: Option<Box<Backlog>>,
    busy: bool,
    /// The service closed the channel while a push was in flight: the push
    /// is answered first, then the channel closes (a Phoenix channel replies
    /// before it stops).
    close_pending: bool,
}

#[derive(Default)]
struct Backlog {
    /// Deliveries that arrived while joining; written after the join reply.
    held: Vec<Delivery>,
    /// Pushes waiting for the one in flight.
    queue: VecDeque<Push>,
}

impl Channel {
    fn backlog(&mut self) -> &mut Backlog {
        self.backlog.get_or_insert_with(Box::default)
    }

    /// Pushes waiting.
    fn queued(&self) -> usize {
        self.backlog.as_ref().map_or(0, |b| b.queue.len())
    }

    /// Deliveries held while joining.
    fn held(&self) -> usize {
        self.backlog.as_ref().map_or(0, |b| b.held.len())
    }

    fn next_push(&mut self) -> Option<Push> {
        let push = self.backlog.as_mut()?.queue.pop_front();
        self.tidy();
        push
    }

    fn take_held(&mut self) -> Vec<Delivery> {
        let held = self
            .backlog
            .as_mut()
            .map(|b| std::mem::take(&mut b.held))
            .unwrap_or_default();
        self.tidy();
        held
    }

    /// Frees the backlog once nothing waits in it.
    fn tidy(&mut self) {
        if self
            .backlog
            .as_ref()
            .is_some_and(|b| b.held.is_empty() && b.queue.is_empty())
        {
            self.backlog = None;
        }
    }
}

/// A socket's channels, ordered by topic: a vector, since most sockets have
/// one or two (a map's first table holds four entries).
#[derive(Default)]
struct Channels(Vec<Channel>);

impl Channels {
    fn find(&self, topic: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|c| (*c.topic).cmp(topic))
    }

    fn get(&self, topic: &str) -> Option<&Channel> {
        self.find(topic).ok().map(|at| &self.0[at])
    }

    fn get_mut(&mut self, topic: &str) -> Option<&mut Channel> {
        self.find(topic).ok().map(|at| &mut self.0[at])
    }

    /// Adds `channel`, or replaces the one of its topic.
    fn insert(&mut self, channel: Channel) {
        match self.find(&channel.topic) {
            Ok(at) => self.0[at] = channel,
            Err(at) => {
                // Grown one at a time while small (the first growth would
                // make four), by doubling beyond.
                if self.0.len() == self.0.capacity() && self.0.len() < 4 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, channel);
            }
        }
    }

    fn remove(&mut self, topic: &str) -> Option<Channel> {
        let at = self.find(topic).ok()?;
        let channel = self.0.remove(at);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(channel)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Channel> {
        self.0.iter()
    }
}

struct Push {
    ref_: Option<String>,
    event: String,
    payload: Box<RawValue>,
}

struct Completion {
    topic: String,
    join_ref: Option<String>,
    sub_id: u64,
    ref_: Option<String>,
    join: bool,
    result: Result<CommandReply, ClientError>,
}

/// What woke the socket's event loop.
enum Event {
    /// Flags the gateway raised ([`signal`]).
    Signals(u8),
    DrainTimer,
    Incoming(Option<Result<Message, ws::Error>>),
    Delivery(Option<Delivery>),
    Done(Box<Completion>),
}

/// Why the loop ended, for the close frame.
struct Close(u16, &'static str);

/// The socket's task: serves `ws` until it closes. Built before it is
/// awaited, so the future holds the socket's state once (an `async fn`'s
/// future keeps its arguments beside what is made of them: `ws` twice).
pub fn run<S>(ws: S, shared: Arc<Shared>, peer: Peer) -> impl Future<Output = ()> + Send
where
    S: Stream<Item = Result<Message, ws::Error>> + Sink<Message> + Unpin + Send,
{
    let (tx, rx) = queue::bounded(shared.config.socket.outbound_queue);
    let live = Live {
        peer,
        tx,
        last_read_ms: AtomicU64::new(shared.clock_ms()),
    };
    let mut socket = Socket {
        shared: shared.clone(),
        live: Arc::new(live),
        ws,
        channels: Channels::default(),
        inflight: None,
        strikes: Strikes::new(shared.config.socket.malformed_limit, shared.clock_ms()),
        budget: PushBudget::new(shared.config.socket.rate_per_sec, shared.clock_ms()),
        control: ControlBudget::new(shared.config.socket.control_rate_per_sec, shared.clock_ms()),
        user_sub_id: shared.hub.next_sub_id(),
    };
    // Moved in once (`serve` by value would keep a second copy).
    async move { socket.serve(rx).await }
}

struct Socket<S> {
    shared: Arc<Shared>,
    /// Who is on it and its queue's sender; shared with the gateway's table
    /// of live sockets.
    live: Arc<Live>,
    ws: S,
    /// Joined (and joining) topics.
    channels: Channels,
    /// Pushes (and joins) in flight: made with the first, dropped once none
    /// is (a set allocates ~140 B when made). Boxed outputs: a completion
    /// (~150 B) would otherwise keep its place in every socket's task.
    inflight: Option<FuturesUnordered<BoxFuture<'static, Box<Completion>>>>,
    strikes: Strikes,
    budget: PushBudget,
    /// WebSocket pings/pongs and Phoenix heartbeats.
    control: ControlBudget,
    user_sub_id: u64,
}

impl<S> Socket<S>
where
    S: Stream<Item = Result<Message, ws::Error>> + Sink<Message> + Unpin + Send,
{
    fn subscriber(&self) -> Subscriber {
        Subscriber {
            user_id: self.live.peer.user_id.clone(),
            tx: self.live.tx.clone(),
        }
    }

    /// The socket's life: opened, its event loop, closed. Opening and
    /// closing run boxed, so their futures are not carried inline through
    /// the socket's life (only the event loop's are).
    async fn serve(&mut self, rx: queue::Receiver<Delivery>) {
        metrics::gauge!("quckchat_gateway_connections").increment(1.0);
        Box::pin(self.open()).await;
        let close = self.event_loop(&rx).await;
        Box::pin(self.close(close)).await;
    }

    /// Announces the socket (presence) and subscribes its user subject.
    async fn open(&mut self) {
        self.shared.opened(&self.live).await;
        if let Err(err) = self
            .shared
            .hub
            .subscribe_user(&self.live.peer.user_id, self.user_sub_id, self.subscriber())
            .await
        {
            tracing::warn!(conn_id = %self.live.peer.conn_id, %err, "user subscription failed");
        }
    }

    /// Ends the socket: the close frame and handshake `close` calls for,
    /// then its channels, user subject and presence.
    async fn close(&mut self, close: Option<Close>) {
        let limit = self.shared.config.socket.write_timeout;
        let _ = tokio::time::timeout(limit, async {
            if let Some(Close(code, reason)) = close {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                if self.ws.send(Message::Close(Some(frame))).await.is_ok() {
                    // Closing handshake: read (and discard) until the client's
                    // close, so unread input does not turn our close into a
                    // TCP reset the client would see as 1006.
                    let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
                        while let Some(Ok(msg)) = self.ws.next().await {
                            if matches!(msg, Message::Close(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                }
            }
            let _ = self.ws.close().await;
        })
        .await;
        let topics: Vec<Box<str>> = self.channels.iter().map(|c| c.topic.clone()).collect();
        for topic in topics {
            self.drop_channel(&topic);
        }
        self.shared
            .hub
            .unsubscribe_user(&self.live.peer.user_id, self.user_sub_id);
        self.shared.closed(&self.live.peer).await;
        metrics::gauge!("quckchat_gateway_connections").decrement(1.0);
    }

    async fn event_loop(&mut self, rx: &queue::Receiver<Delivery>) -> Option<Close> {
        // Set once the server drains.
        let mut drain: Option<Box<Draining>> = None;
        let restart = || Some(Close(close_code::RESTART, "server restart"));
        let slow = || Some(Close(close_code::TRY_AGAIN_LATER, "slow consumer"));
        loop {
            // The socket fell behind (its queue was full, or a joining
            // channel held too much): cut off before anything else is done.
            if rx.overflowed() {
                return slow();
            }
            let closing = drain.as_ref().is_some_and(|d| d.closing);
            // One poll over every source, in this order, instead of a select
            // of futures: the socket's task keeps no future per source.
            let event = poll_fn(|cx| {
                if let Poll::Ready(bits) = rx.poll_signals(cx) {
                    return Poll::Ready(Event::Signals(bits));
                }
                if let Some(d) = drain.as_mut() {
                    if d.timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::DrainTimer);
                    }
                }
                if !closing {
                    if let Poll::Ready(incoming) = self.ws.poll_next_unpin(cx) {
                        return Poll::Ready(Event::Incoming(incoming));
                    }
                }
                if let Poll::Ready(delivery) = rx.poll_recv(cx) {
                    return Poll::Ready(Event::Delivery(delivery));
                }
                match self.inflight.as_mut().map(|f| f.poll_next_unpin(cx)) {
                    Some(Poll::Ready(Some(done))) => Poll::Ready(Event::Done(done)),
                    // None in flight, or none answered yet.
                    _ => Poll::Pending,
                }
            })
            .await;
            match event {
                Event::Signals(bits) => {
                    if bits & signal::DRAIN != 0 && drain.is_none() {
                        // Spread reconnects over the drain window.
                        let started = Instant::now();
                        let window = self.shared.config.server.drain.mul_f64(0.8);
                        drain = Some(Box::new(Draining {
                            started,
                            timer: Box::pin(sleep_until(
                                started + window.mul_f64(rand::random::<f64>()),
                            )),
                            closing: false,
                        }));
                    }
                    let idle_timeout = self.shared.config.socket.idle_timeout;
                    if bits & signal::IDLE != 0
                        && !closing
                        && u128::from(self.live.idle_ms(self.shared.clock_ms()))
                            >= idle_timeout.as_millis()
                    {
                        return Some(Close(close_code::NORMAL, "idle timeout"));
                    }
                }
                Event::DrainTimer => {
                    let Some(d) = drain.as_mut() else { continue };
                    if d.closing || self.idle() {
                        return restart();
                    }
                    d.closing = true;
                    let last = d.started + self.shared.config.server.drain.mul_f64(0.95);
                    d.timer.as_mut().reset(last.max(Instant::now()));
                }
                Event::Incoming(None) => return None,
                Event::Incoming(Some(Err(err))) => return read_error_close(&err),
                Event::Incoming(Some(Ok(msg))) => {
                    self.live.read_at(self.shared.clock_ms());
                    // The handlers run boxed: their futures (a join's, a
                    // reply's write) would otherwise sit inline in every
                    // socket's task, idle or not (docs: bench/ANALYSIS.md).
                    if let Err(close) = Box::pin(self.on_message(msg)).await {
                        return close;
                    }
                }
                Event::Delivery(next) => {
                    // The socket holds a sender of its queue: the queue ends
                    // only when cut off.
                    let Some(delivery) = next else { return slow() };
                    if Box::pin(self.on_deliveries(delivery, rx)).await.is_err() {
                        return None;
                    }
                }
                Event::Done(done) => {
                    if Box::pin(self.on_completion(done)).await.is_err() {
                        return None;
                    }
                    if self.idle() {
                        self.inflight = None;
                        if closing {
                            return restart();
                        }
                    }
                }
            }
        }
    }

    /// Nothing in flight.
    fn idle(&self) -> bool {
        self.inflight
            .as_ref()
            .is_none_or(FuturesUnordered::is_empty)
    }

    /// Runs a push (or join) until it completes.
    fn start(&mut self, push: BoxFuture<'static, Box<Completion>>) {
        self.inflight
            .get_or_insert_with(FuturesUnordered::new)
            .push(push);
    }

    /// Queues a frame without flushing.
    async fn feed(&mut self, text: Utf8Bytes) -> Result<(), ()> {
        let limit = self.shared.config.socket.write_timeout;
        match tokio::time::timeout(limit, self.ws.feed(Message::Text(text))).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Flushes what was fed; a client that stopped reading fails it.
    async fn flush(&mut self) -> Result<(), ()> {
        let limit = self.shared.config.socket.write_timeout;
        match tokio::time::timeout(limit, self.ws.flush()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    async fn write(&mut self, text: String) -> Result<(), ()> {
        self.feed(text.into()).await?;
        self.flush().await
    }

    async fn reply(
        &mut self,
        join_ref: Option<&str>,
        ref_: Option<&str>,
        topic: &str,
        ok: bool,
        response: &str,
    ) -> Result<(), ()> {
        let payload = frame::reply_payload(ok, response);
        let text = frame::encode(
            self.live.peer.vsn,
            join_ref,
            ref_,
            topic,
            "phx_reply",
            &payload,
        );
        self.write(text).await
    }

    async fn error(
        &mut self,
        join_ref: Option<&str>,
        ref_: Option<&str>,
        topic: &str,
        err: &ClientError,
    ) -> Result<(), ()> {
        self.reply(join_ref, ref_, topic, false, &err.response().to_string())
            .await
    }

    /// `phx_close` for a channel, as Phoenix sends it (ref = join_ref).
    async fn send_close(&mut self, join_ref: Option<&str>, topic: &str) -> Result<(), ()> {
        let text = frame::encode(
            self.live.peer.vsn,
            join_ref,
            join_ref,
            topic,
            "phx_close",
            "{}",
        );
        self.write(text).await
    }

    /// Counts an unusable frame; too many in a minute closes the socket.
    fn strike(&mut self) -> Result<(), Option<Close>> {
        metrics::counter!("quckchat_gateway_malformed_frames_total").increment(1);
        if self.strikes.strike(self.shared.clock_ms()) {
            return Err(Some(Close(close_code::POLICY, "too many malformed frames")));
        }
        Ok(())
    }

    /// Takes one token from the control budget (pings, pongs, heartbeats);
    /// a socket over it is closed with 1008 rather than kept answering.
    fn control_frame(&mut self) -> Result<(), Option<Close>> {
        if self.control.take(self.shared.clock_ms()) {
            return Ok(());
        }
        metrics::counter!("quckchat_gateway_control_limited_total").increment(1);
        tracing::warn!(
            conn_id = %self.live.peer.conn_id,
            user_id = %self.live.peer.user_id,
            "control frames over budget: closing the socket"
        );
        Err(Some(Close(close_code::POLICY, "too many control frames")))
    }

    /// Takes one token from the push budget.
    fn allow_push(&mut self) -> bool {
        self.budget.take(self.shared.clock_ms())
    }

    async fn on_message(&mut self, msg: Message) -> Result<(), Option<Close>> {
        let max = self.shared.config.socket.max_frame_bytes;
        match msg {
            Message::Text(text) => {
                let decoded = frame::decode_text(self.live.peer.vsn, text.as_str());
                if text.len() > max {
                    return match decoded {
                        Ok(InFrame {
                            join_ref,
                            ref_: Some(ref_),
                            topic,
                            ..
                        })
                        | Err(FrameError::Invalid {
                            join_ref,
                            ref_,
                            topic,
                            ..
                        }) => {
                            metrics::counter!("quckchat_gateway_oversized_frames_total")
                                .increment(1);
                            self.error(
                                join_ref.as_deref(),
                                Some(&ref_),
                                &topic,
                                &ClientError::PayloadTooLarge { limit: max },
                            )
                            .await
                            .map_err(|()| None)
                        }
                        _ => self.strike(),
                    };
                }
                match decoded {
                    Ok(frame) => {
                        if frame.topic == "phoenix" && frame.event == "heartbeat" {
                            self.control_frame()?;
                        }
                        self.on_frame(frame).await.map_err(|()| None)
                    }
                    Err(FrameError::Invalid {
                        join_ref,
                        ref_,
                        topic,
                        reason,
                    }) => {
                        self.strike()?;
                        let err = ClientError::InvalidFrame(reason);
                        self.error(join_ref.as_deref(), Some(&ref_), &topic, &err)
                            .await
                            .map_err(|()| None)
                    }
                    Err(FrameError::Unusable) => self.strike(),
                }
            }
            Message::Binary(data) => match frame::decode_binary_push(&data) {
                Some(p) => self
                    .error(
                        p.join_ref.as_deref(),
                        Some(&p.ref_),
                        &p.topic,
                        &ClientError::BinaryPayload,
                    )
                    .await
                    .map_err(|()| None),
                None => self.strike(),
            },
            Message::Close(_) => Err(None),
            // The transport has already queued the pong: only count it.
            Message::Ping(_) | Message::Pong(_) => self.control_frame(),
        }
    }

    async fn on_frame(&mut self, f: InFrame) -> Result<(), ()> {
        if f.topic == "phoenix" && f.event == "heartbeat" {
            return self
                .reply(None, f.ref_.as_deref(), "phoenix", true, "{}")
                .await;
        }
        if !self.allow_push() {
            metrics::counter!("quckchat_gateway_rate_limited_total").increment(1);
            return self
                .error(
                    f.join_ref.as_deref(),
                    f.ref_.as_deref(),
                    &f.topic,
                    &ClientError::RateLimited,
                )
                .await;
        }
        if f.event == "phx_join" {
            return self.join(f).await;
        }
        let Some(channel) = self.channels.get(&f.topic) else {
            return self
                .error(
                    f.join_ref.as_deref(),
                    f.ref_.as_deref(),
                    &f.topic,
                    &ClientError::UnmatchedTopic,
                )
                .await;
        };
        let join_ref = channel.join_ref.clone();
        if f.event == "phx_leave" {
            self.abandon(&f.topic).await?;
            self.reply(join_ref.as_deref(), f.ref_.as_deref(), &f.topic, true, "{}")
                .await?;
            return self.send_close(join_ref.as_deref(), &f.topic).await;
        }
        // One cap for the whole socket: pushes waiting on a stalled service.
        let queued: usize = self.channels.iter().map(Channel::queued).sum();
        if queued >= self.shared.config.socket.outbound_queue {
            return self
                .error(
                    join_ref.as_deref(),
                    f.ref_.as_deref(),
                    &f.topic,
                    &ClientError::RateLimited,
                )
                .await;
        }
        if let Some(channel) = self.channels.get_mut(&f.topic) {
            channel.backlog().queue.push_back(Push {
                ref_: f.ref_,
                event: f.event,
                payload: f.payload,
            });
        }
        self.pump(&f.topic);
        Ok(())
    }

    async fn join(&mut self, f: InFrame) -> Result<(), ()> {
        let route = match routing::route(&f.topic) {
            Ok(route) => route,
            Err(err) => {
                metrics::counter!(
                    "quckchat_gateway_joins_total",
                    "kind" => "unknown",
                    "result" => "rejected",
                )
                .increment(1);
                return self
                    .error(f.join_ref.as_deref(), f.ref_.as_deref(), &f.topic, &err)
                    .await;
            }
        };
        if let Some(old) = self.channels.get(&f.topic) {
            // A second join closes the first, as Phoenix does.
            let old_ref = old.join_ref.clone();
            self.abandon(&f.topic).await?;
            self.send_close(old_ref.as_deref(), &f.topic).await?;
        } else if self.channels.len() >= self.shared.config.socket.max_channels {
            metrics::counter!(
                "quckchat_gateway_joins_total",
                "kind" => route.kind,
                "result" => "rejected",
            )
            .increment(1);
            return self
                .error(
                    f.join_ref.as_deref(),
                    f.ref_.as_deref(),
                    &f.topic,
                    &ClientError::TooManyChannels,
                )
                .await;
        }
        let sub_id = self.shared.hub.next_sub_id();
        self.channels.insert(Channel {
            topic: f.topic.as_str().into(),
            join_ref: f.join_ref.as_deref().map(Box::from),
            sub_id,
            route,
            joined: false,
            backlog: None,
            busy: true,
            close_pending: false,
        });
        let shared = self.shared.clone();
        // Registered now, so leaving or rejoining before the join completes
        // always finds (and removes) this registration.
        let subject = shared.subjects.topic(&f.topic);
        let registration =
            shared
                .hub
                .register(&subject, SubjectKind::Topic, sub_id, self.subscriber());
        let command = self.command(&f.topic, "phx_join", f.payload.get());
        let topic = f.topic;
        let ref_ = f.ref_;
        let join_ref = f.join_ref;
        self.start(Box::pin(async move {
            let result = match shared.hub.ready(&registration).await {
                Ok(()) => shared.request(route, command).await,
                Err(err) => {
                    tracing::warn!(%err, %topic, "topic subscription failed");
                    metrics::counter!(
                        "quckchat_gateway_joins_total",
                        "kind" => route.kind,
                        "result" => "unavailable",
                    )
                    .increment(1);
                    Err(ClientError::Unavailable)
                }
            };
            Box::new(Completion {
                topic,
                join_ref,
                sub_id,
                ref_,
                join: true,
                result,
            })
        }));
        Ok(())
    }

    fn command(&self, topic: &str, event: &str, payload: &str) -> ClientCommand {
        ClientCommand {
            conn_id: self.live.peer.conn_id.to_string(),
            user_id: self.live.peer.user_id.to_string(),
            device_id: self.live.peer.device_id.clone(),
            topic: topic.to_owned(),
            event: event.to_owned(),
            payload: payload.as_bytes().to_vec(),
            node_id: self.shared.config.server.node_name.clone(),
        }
    }

    /// Starts the next queued push of a channel if none is in flight.
    fn pump(&mut self, topic: &str) {
        let Some(channel) = self.channels.get_mut(topic) else {
            return;
        };
        if channel.busy || !channel.joined {
            return;
        }
        let Some(push) = channel.next_push() else {
            return;
        };
        channel.busy = true;
        let (sub_id, route) = (channel.sub_id, channel.route);
        let join_ref = channel.join_ref.as_deref().map(str::to_owned);
        let command = self.command(topic, &push.event, push.payload.get());
        let shared = self.shared.clone();
        let topic = topic.to_owned();
        self.start(Box::pin(async move {
            let result = shared.request(route, command).await;
            Box::new(Completion {
                topic,
                join_ref,
                sub_id,
                ref_: push.ref_,
                join: false,
                result,
            })
        }));
    }

    async fn on_completion(&mut self, done: Box<Completion>) -> Result<(), ()> {
        let current = self
            .channels
            .get(&done.topic)
            .is_some_and(|c| c.sub_id == done.sub_id);
        if !current {
            // The channel was left or replaced meanwhile (it got its
            // phx_close). Every push still gets its one reply, with the join_ref
            // it was sent with, so the client does not mistake it for the
            // current channel's.
            if done.join {
                return self
                    .error(
                        done.join_ref.as_deref(),
                        done.ref_.as_deref(),
                        &done.topic,
                        &ClientError::Closed,
                    )
                    .await;
            }
            let (ok, response) = match &done.result {
                Ok(r) => (
                    r.status() == command_reply::Status::Ok,
                    json_payload(&r.response)
                        .map(|r| r.get().to_owned())
                        .unwrap_or_else(|| "{}".into()),
                ),
                Err(err) => (false, err.response().to_string()),
            };
            return self
                .reply(
                    done.join_ref.as_deref(),
                    done.ref_.as_deref(),
                    &done.topic,
                    ok,
                    &response,
                )
                .await;
        }
        let join_ref = done.join_ref.clone();
        let topic = done.topic;
        let reply = match done.result {
            Ok(reply) => reply,
            Err(reason) => {
                if done.join {
                    self.abandon(&topic).await?;
                } else if let Some(ch) = self.channels.get_mut(&topic) {
                    ch.busy = false;
                }
                self.error(join_ref.as_deref(), done.ref_.as_deref(), &topic, &reason)
                    .await?;
                if self.close_if_pending(&topic, join_ref.as_deref()).await? {
                    return Ok(());
                }
                self.pump(&topic);
                return Ok(());
            }
        };
        let ok = reply.status() == command_reply::Status::Ok;
        let response = json_payload(&reply.response)
            .map(|r| r.get().to_owned())
            .unwrap_or_else(|| ClientError::Internal.response().to_string());
        if done.join && !ok {
            self.abandon(&topic).await?;
            return self
                .reply(
                    join_ref.as_deref(),
                    done.ref_.as_deref(),
                    &topic,
                    false,
                    &response,
                )
                .await;
        }
        self.reply(
            join_ref.as_deref(),
            done.ref_.as_deref(),
            &topic,
            ok,
            &response,
        )
        .await?;
        for ev in reply.followups {
            let payload = json_payload(&ev.payload)
                .map(|p| p.get().to_owned())
                .unwrap_or_else(|| "{}".into());
            let text = frame::encode(
                self.live.peer.vsn,
                join_ref.as_deref(),
                None,
                &topic,
                &ev.event,
                &payload,
            );
            self.feed(text.into()).await?;
        }
        if done.join {
            // A sequenced topic (chat) says where its sequence stands: the
            // node fills gaps from there (hub.rs, GapFill).
            if let Ok(Sequenced {
                last_seq: Some(last),
            }) = serde_json::from_str(&response)
            {
                self.shared
                    .hub
                    .note_seq(&self.shared.subjects.topic(&topic), last);
            }
        }
        let held = match self.channels.get_mut(&topic) {
            Some(ch) => {
                ch.busy = false;
                if done.join {
                    ch.joined = true;
                }
                ch.take_held()
            }
            None => Vec::new(),
        };
        for delivery in held {
            self.on_delivery(delivery).await?;
        }
        if self.close_if_pending(&topic, join_ref.as_deref()).await? {
            return self.flush().await;
        }
        self.flush().await?;
        self.pump(&topic);
        Ok(())
    }

    /// Closes the channel if the service closed it while a push was in
    /// flight (now answered); whether it did.
    async fn close_if_pending(&mut self, topic: &str, join_ref: Option<&str>) -> Result<bool, ()> {
        if !self.channels.get(topic).is_some_and(|c| c.close_pending) {
            return Ok(false);
        }
        self.abandon(topic).await?;
        self.send_close(join_ref, topic).await?;
        Ok(true)
    }

    /// Writes `first` and what else is queued (up to a batch), then flushes
    /// once.
    async fn on_deliveries(
        &mut self,
        first: Delivery,
        rx: &queue::Receiver<Delivery>,
    ) -> Result<(), ()> {
        self.on_delivery(first).await?;
        for _ in 0..DELIVERY_BATCH {
            let Some(delivery) = rx.try_recv() else {
                // Caught up: the queue's buffer goes until the next burst
                // (most sockets wait long between deliveries).
                rx.release_if_empty();
                break;
            };
            self.on_delivery(delivery).await?;
        }
        self.flush().await
    }

    /// Writes one fan-out delivery (fed, not flushed).
    async fn on_delivery(&mut self, d: Delivery) -> Result<(), ()> {
        // The item is shared with the topic's other sockets: borrow the
        // topic from it rather than copy it for every delivery.
        let item = d.item.clone();
        let topic = match &*item {
            Item::Broadcast(b) => b.topic.as_str(),
            // Meant for another connection of this user.
            Item::Direct(ev)
                if (!ev.conn_id.is_empty() && ev.conn_id != *self.live.peer.conn_id)
                    || ev.except_conn_id == *self.live.peer.conn_id =>
            {
                return Ok(());
            }
            Item::Direct(ev) => ev.topic.as_str(),
            Item::SubscriptionLost { topic } => match topic {
                Some(t) => t.as_str(),
                None => return self.on_subscription_lost(d.sub_id).await,
            },
        };
        let Some(channel) = self.channels.get_mut(topic) else {
            return Ok(());
        };
        let direct = matches!(&*d.item, Item::Direct(_));
        if !direct && channel.sub_id != d.sub_id {
            return Ok(());
        }
        if !channel.joined {
            if channel.held() >= self.shared.config.socket.outbound_queue {
                if self.live.tx.overflow() {
                    metrics::counter!("quckchat_gateway_slow_consumers_total").increment(1);
                }
            } else {
                channel.backlog().held.push(d);
            }
            return Ok(());
        }
        if channel.busy
            && matches!(&*d.item, Item::Direct(ev) if matches!(ev.kind, Some(direct_event::Kind::Close(_))))
        {
            channel.close_pending = true;
            return Ok(());
        }
        match &*item {
            Item::Broadcast(b) => {
                let text = b.frame(self.live.peer.vsn);
                self.feed(text).await
            }
            Item::Direct(ev) => match &ev.kind {
                Some(direct_event::Kind::Push(p)) => {
                    let payload = json_payload(&p.payload)
                        .map(|p| p.get().to_owned())
                        .unwrap_or_else(|| "{}".into());
                    let text = frame::encode(
                        self.live.peer.vsn,
                        channel.join_ref.as_deref(),
                        None,
                        topic,
                        &p.event,
                        &payload,
                    );
                    self.feed(text.into()).await
                }
                Some(direct_event::Kind::Close(_)) => {
                    let join_ref = channel.join_ref.clone();
                    self.abandon(topic).await?;
                    self.send_close(join_ref.as_deref(), topic).await
                }
                None => Ok(()),
            },
            Item::SubscriptionLost { .. } => Ok(()),
        }
    }

    /// The bus subscription behind a channel ended: `phx_error` so the client
    /// rejoins (with backoff) and resubscribes.
    async fn on_subscription_lost(&mut self, sub_id: u64) -> Result<(), ()> {
        if sub_id == self.user_sub_id {
            // Without its user subject the socket would miss channel closes
            // and calls: end it, the client reconnects and resubscribes.
            tracing::warn!(conn_id = %self.live.peer.conn_id, "user subscription lost: closing the socket");
            return Err(());
        }
        let Some((topic, join_ref)) = self
            .channels
            .iter()
            .find(|c| c.sub_id == sub_id)
            .map(|c| (c.topic.clone(), c.join_ref.clone()))
        else {
            return Ok(());
        };
        self.abandon(&topic).await?;
        let text = frame::encode(
            self.live.peer.vsn,
            join_ref.as_deref(),
            join_ref.as_deref(),
            &topic,
            "phx_error",
            "{}",
        );
        self.write(text).await
    }

    /// Forgets a channel and answers the pushes still queued on it, so every
    /// push gets exactly one reply.
    async fn abandon(&mut self, topic: &str) -> Result<(), ()> {
        let Some(channel) = self.drop_channel(topic) else {
            return Ok(());
        };
        for push in channel.backlog.map(|b| b.queue).unwrap_or_default() {
            self.error(
                channel.join_ref.as_deref(),
                push.ref_.as_deref(),
                topic,
                &ClientError::UnmatchedTopic,
            )
            .await?;
        }
        Ok(())
    }

    /// Forgets a channel: its hub registration, and tells the service when it
    /// wants to know.
    fn drop_channel(&mut self, topic: &str) -> Option<Channel> {
        let channel = self.channels.remove(topic)?;
        self.shared
            .hub
            .unsubscribe(&self.shared.subjects.topic(topic), channel.sub_id);
        if channel.route.notify_leave && channel.joined {
            let command = self.command(topic, "phx_leave", "{}");
            let shared = self.shared.clone();
            let route = channel.route;
            tokio::spawn(async move { shared.notify(route, command).await });
        }
        Some(channel)
    }
}

#[cfg(test)]
#[path = "socket_tests.rs"]
mod tests;

/// The part of a join reply that says where a topic's sequence stands.
#[derive(serde::Deserialize)]
struct Sequenced {
    #[serde(rename = "lastSeq")]
    last_seq: Option<u64>,
}
