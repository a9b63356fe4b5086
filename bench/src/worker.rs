//! One load-generating process (`bench --worker`): it owns a slice of the
//! scenario's connections, and talks to the orchestrator over stdio.
//!
//! 1. reads its [`Plan`] (one JSON line) from stdin;
//! 2. opens its connections, each from a source address `127.0.0.<k>` chosen
//!    round-robin (so no single source runs out of ephemeral ports), joins
//!    each to its topic, then prints `{"ready":…}`;
//! 3. waits for `go` on stdin, sends at its share of the target rate for the
//!    run's duration, waits the drain time for late deliveries;
//! 4. prints its [`WorkerReport`] as one JSON line and exits (the kernel
//!    closes the sockets).
//!
//! Sends are open-loop: a pacer hands each due send, stamped with the time it
//! was *due*, to a sender connection; a connection that has fallen behind by
//! a full queue skips it (counted). Latency therefore includes client-side
//! queueing, never hides it.
//!
//! The `calls` scenario ([`calls`]) opens its connections by pairs, one task
//! per pair driving both sockets; the pacer hands due calls to the pairs.
//! The `huddle` scenario ([`huddle`]) opens them by rooms, one task per room
//! driving all its participants' sockets; the pacer hands due pushes to the
//! rooms.

mod calls;
mod huddle;

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cli::CallType;
use crate::dialect::{content, Dialect, Incoming};
use crate::layout::{Layout, Scenario};
use crate::stats::Stats;

/// Everything a worker needs, sent by the orchestrator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub run_id: String,
    pub scenario: Scenario,
    pub dialect: Dialect,
    /// WebSocket servers: connection `i` goes to `servers[i % len]`.
    pub servers: Vec<SocketAddr>,
    pub jwt_secret: String,
    /// Connections of the whole scenario, and this worker's `[start, end)`.
    pub connections: usize,
    pub start: usize,
    pub end: usize,
    pub group_min: usize,
    pub group_max: usize,
    /// Sends per second of the whole scenario.
    pub rate: f64,
    pub duration_ms: u64,
    pub drain_ms: u64,
    pub heartbeat_ms: u64,
    pub payload_bytes: usize,
    pub sources: u8,
    pub connect_concurrency: usize,
    /// calls: ICE candidates per party per call.
    #[serde(default)]
    pub ice_candidates: u32,
    /// calls: `callType` of every call.
    #[serde(default = "audio")]
    pub call_type: CallType,
    /// huddle: the share of pushes that are toggles (the rest: relays).
    #[serde(default)]
    pub toggle_share: f64,
    /// Tries per connection (connect and join), at least 1.
    #[serde(default = "one_try")]
    pub connect_attempts: u32,
}

fn audio() -> CallType {
    CallType::Audio
}

fn one_try() -> u32 {
    1
}

/// Waits before the 2nd, 3rd, ... try of a connection: the Phoenix client's
/// rejoin schedule (1 s, 2 s, then 5 s).
fn retry_after(failed_tries: u32) -> Duration {
    match failed_tries {
        0 | 1 => Duration::from_secs(1),
        2 => Duration::from_secs(2),
        _ => Duration::from_secs(5),
    }
}

/// Queue of due sends per sender connection.
const SEND_QUEUE: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

pub fn main() -> ExitCode {
    let result = (|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let plan: Plan = serde_json::from_str(&line).context("worker plan on stdin")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(run(plan))
    })();
    match result {
        Ok(()) => {
            // Exit without dropping thousands of sockets one by one.
            let _ = std::io::stdout().flush();
            std::process::exit(0)
        }
        Err(err) => {
            eprintln!("bench worker: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(line: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn run(plan: Plan) -> anyhow::Result<()> {
    if plan.servers.is_empty() {
        bail!("plan names no server");
    }
    // Every connection is a file; leave room for the runtime's own.
    let want = (plan.end - plan.start) as u64 + 64;
    if let Some(limit) = crate::procfs::open_files_soft_limit() {
        if want > limit {
            bail!(
                "{} connections need ~{want} open files, ulimit -n is {limit}: lower --per-worker",
                plan.end - plan.start
            );
        }
    }
    let plan = Arc::new(plan);
    let layout = Arc::new(Layout::new(
        plan.scenario,
        &plan.run_id,
        plan.connections,
        plan.group_min,
        plan.group_max,
    ));
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();

    // Connect and join everything, a bounded number at a time.
    let opened = Instant::now();
    let senders = match plan.scenario {
        Scenario::Calls => calls::open(&plan, &layout, &stats, &stop).await,
        Scenario::Huddle => huddle::open(&plan, &layout, &stats, &stop).await,
        _ => open(&plan, &layout, &stats, &stop).await,
    };
    say(&serde_json::json!({"ready": {
        "connected": stats.connected.load(std::sync::atomic::Ordering::Relaxed),
        "connect_secs": opened.elapsed().as_secs_f64(),
    }}));

    // Wait for the orchestrator's go.
    let go = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await??;
    if go.trim() != "go" {
        bail!("expected `go` on stdin, got {go:?}");
    }

    let total_senders = layout.senders().max(1);
    let share = plan.rate * senders.len() as f64 / total_senders as f64;
    pace(
        &senders,
        share,
        Duration::from_millis(plan.duration_ms),
        &stats,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(plan.drain_ms)).await;
    stop.cancel();
    say(&serde_json::to_value(stats.report()?)?);
    Ok(())
}

/// Opens and joins every connection of the worker, each then served by its
/// own task; returns the send queues of the sender connections.
async fn open(
    plan: &Arc<Plan>,
    layout: &Arc<Layout>,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
) -> Vec<mpsc::Sender<u64>> {
    let gate = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let mut joins = Vec::with_capacity(plan.end - plan.start);
    for i in plan.start..plan.end {
        let (plan, layout, stats, stop, gate) = (
            plan.clone(),
            layout.clone(),
            stats.clone(),
            stop.clone(),
            gate.clone(),
        );
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            // Boxed: the connect and join (~2.4 KiB of future) are done
            // with before the connection's long wait, and the task keeps
            // only room for what it awaits.
            let opened = Box::pin(open_one(&plan, &layout, &stats, i)).await;
            drop(permit);
            let Some(conn) = opened else {
                let _ = ready_tx.send(None);
                return;
            };
            // Only a sender has a queue (tokio's allocates ~0.5 KiB when
            // made): the others are served with none.
            let (send_tx, send_rx) = match layout.is_sender(i) {
                true => {
                    let (tx, rx) = mpsc::channel(SEND_QUEUE);
                    (Some(tx), Some(rx))
                }
                false => (None, None),
            };
            stats.bump(|s| &s.connected);
            let _ = ready_tx.send(send_tx);
            conn.serve(&plan, &stats, send_rx, stop).await;
        });
        joins.push(ready_rx);
    }
    let mut senders = Vec::new();
    for rx in joins {
        if let Ok(Some(tx)) = rx.await {
            senders.push(tx);
        }
    }
    senders
}

/// Connects and joins connection `i`, up to `connect_attempts` tries (a
/// fresh socket each, as a Phoenix client reconnects); a try that is retried
/// is counted in `retried` with its reason under `retried: …`, a connection
/// whose last try fails in the connect or join errors.
async fn open_one(plan: &Plan, layout: &Layout, stats: &Stats, i: usize) -> Option<Connection> {
    let tries = plan.connect_attempts.max(1);
    for attempt in 1..=tries {
        let opened = match connect(plan, layout, i).await {
            Ok(ws) => join(ws, plan, layout, i)
                .await
                .map_err(|e| (&stats.join_errors, format!("join: {}", e.root_cause()))),
            Err(e) => Err((
                &stats.connect_errors,
                format!("connect: {}", e.root_cause()),
            )),
        };
        match opened {
            Ok(conn) => return Some(conn),
            Err((_, reason)) if attempt < tries => {
                stats.bump(|s| &s.retried);
                stats.error(&format!("retried: {reason}"));
                tokio::time::sleep(retry_after(attempt)).await;
            }
            Err((counter, reason)) => {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stats.error(&reason);
            }
        }
    }
    None
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// Hands out `rate` sends per second round-robin over `senders` for
/// `duration`, each stamped with the wall-clock time it was due.
async fn pace(senders: &[mpsc::Sender<u64>], rate: f64, duration: Duration, stats: &Stats) {
    if senders.is_empty() || rate <= 0.0 {
        tokio::time::sleep(duration).await;
        return;
    }
    let start = Instant::now();
    let start_ns = now_ns();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut issued: u64 = 0;
    let total = (duration.as_secs_f64() * rate).ceil() as u64;
    let mut next = 0;
    loop {
        tick.tick().await;
        let elapsed = start.elapsed().min(duration);
        // Send k is due at k / rate: at time t, sends 0 ..= floor(t·rate) are.
        let due = ((elapsed.as_secs_f64() * rate) as u64 + 1).min(total);
        while issued < due {
            let due_ns = start_ns + (issued as f64 * 1e9 / rate) as u64;
            issued += 1;
            stats.bump(|s| &s.sends);
            if senders[next].try_send(due_ns).is_err() {
                stats.bump(|s| &s.send_skipped);
            }
            next = (next + 1) % senders.len();
        }
        if elapsed >= duration {
            return;
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// An open, joined connection.
struct Connection {
    ws: Ws,
    dialect: Dialect,
    topic: String,
    members: u64,
}

/// Source address of connection `i`: 127.0.0.1 … 127.0.0.<sources>.
fn source(plan: &Plan, i: usize) -> SocketAddr {
    let k = 1 + (i % plan.sources.max(1) as usize) as u8;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, k)), 0)
}

/// The server connection `i` talks to: round-robin over the gateways.
fn server(plan: &Plan, i: usize) -> SocketAddr {
    plan.servers[i % plan.servers.len()]
}

/// TCP from this connection's source address, then the WebSocket upgrade.
async fn connect(plan: &Plan, layout: &Layout, i: usize) -> anyhow::Result<Ws> {
    let server = server(plan, i);
    let token = quckchat_runtime::auth::mint_token(
        &plan.jwt_secret,
        &layout.user(i),
        Duration::from_secs(3600),
    );
    let mut url = format!("ws://{server}{}", plan.dialect.path(&token));
    if plan.scenario == Scenario::Huddle {
        // Huddle participants are devices: each socket names its own.
        url.push_str(&format!("&deviceId={}", layout.device(i)));
    }
    // Idle sockets only read heartbeat replies: a small buffer keeps the
    // load generator as lean per socket as the server it measures.
    let read_buffer = if plan.scenario == Scenario::Idle {
        1024
    } else {
        4096
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0);
    timeout(CONNECT_TIMEOUT, async {
        let socket = TcpSocket::new_v4()?;
        // The port is picked at connect, where only the 4-tuple must be
        // unique: a bind with port 0 would reserve a port for every socket
        // and make each further bind scan those (the kernel's bind buckets
        // took most of the CPU past ~200k sockets).
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .context("IP_BIND_ADDRESS_NO_PORT")?;
        socket
            .bind(source(plan, i))
            .context("bind source address")?;
        let stream = socket.connect(server).await.context("connect")?;
        stream.set_nodelay(true)?;
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(config))
                .await
                .context("websocket upgrade")?;
        anyhow::Ok(ws)
    })
    .await
    .context("connect timed out")?
}

/// Socket.IO namespace connect if needed, then joins the connection's topic.
async fn join(mut ws: Ws, plan: &Plan, layout: &Layout, i: usize) -> anyhow::Result<Connection> {
    let conversation = layout.conversation_of(i);
    let topic = layout.topic(i);
    let dialect = plan.dialect;
    if dialect.needs_namespace_connect() {
        ws.send(Message::text(dialect.namespace_connect())).await?;
        expect(&mut ws, |t| dialect.is_namespace_connected(t))
            .await
            .context("socket.io connect")?;
    }
    ws.send(Message::text(dialect.join(&topic, join_ref(dialect))))
        .await?;
    let mut joined = None;
    expect(&mut ws, |t| match dialect.parse(t) {
        Incoming::Ack {
            reference,
            ok,
            ref reason,
        } if reference == join_ref(dialect) => {
            joined = Some(if ok { Ok(()) } else { Err(reason.clone()) });
            true
        }
        _ => false,
    })
    .await
    .context("join")?;
    if let Some(Err(reason)) = joined {
        bail!("join refused: {}", reason.unwrap_or_default());
    }
    Ok(Connection {
        ws,
        dialect,
        topic,
        members: conversation.size as u64,
    })
}

/// The join's ref (Phoenix join_ref) / ack id (Socket.IO); sends follow it.
fn join_ref(dialect: Dialect) -> u64 {
    match dialect {
        Dialect::Phoenix => 1,
        Dialect::SocketIo => 0,
    }
}

/// Reads frames until one satisfies `want` (answering pings meanwhile).
async fn expect(ws: &mut Ws, mut want: impl FnMut(&str) -> bool) -> anyhow::Result<()> {
    timeout(CONNECT_TIMEOUT, async {
        while let Some(msg) = ws.next().await {
            if let Message::Text(text) = msg? {
                if text.as_str() == "2" {
                    ws.send(Message::text("3")).await?;
                } else if want(text.as_str()) {
                    return Ok(());
                }
            }
        }
        bail!("closed by the server")
    })
    .await
    .context("no answer in time")?
}

impl Connection {
    /// Sends what the pacer hands over, records deliveries and acks,
    /// heartbeats, until `stop`.
    async fn serve(
        mut self,
        plan: &Plan,
        stats: &Stats,
        mut send_rx: Option<mpsc::Receiver<u64>>,
        stop: CancellationToken,
    ) {
        let heartbeat = Duration::from_millis(plan.heartbeat_ms.max(1000));
        // Spread heartbeats over the period rather than all at once.
        let phase = heartbeat.mul_f64((now_ns() % 1000) as f64 / 1000.0);
        let mut beat = tokio::time::interval_at(Instant::now() + phase, heartbeat);
        let mut next_ref = join_ref(self.dialect) + 1;
        let mut pending: VecDeque<(u64, u64)> = VecDeque::new();
        let mut senders_open = send_rx.is_some();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                msg = self.ws.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                            stats.bump(|s| &s.closed);
                            return;
                        }
                        Some(Ok(_)) => continue,
                    };
                    match self.dialect.parse(text.as_str()) {
                        Incoming::Delivery { sent_ns } => {
                            stats.delivery(now_ns().saturating_sub(sent_ns) / 1000);
                        }
                        Incoming::Ack { reference, ok, reason } => {
                            let Some(at) = pending.iter().position(|(r, _)| *r == reference) else {
                                continue;
                            };
                            let (_, sent_ns) = pending.remove(at).unwrap_or_default();
                            if ok {
                                stats.ack(now_ns().saturating_sub(sent_ns) / 1000, self.members);
                            } else {
                                stats.bump(|s| &s.acks_error);
                                stats.error(reason.as_deref().unwrap_or("error reply"));
                            }
                        }
                        Incoming::Ping => {
                            if self.ws.send(Message::text(self.dialect.pong())).await.is_err() {
                                stats.bump(|s| &s.closed);
                                return;
                            }
                        }
                        Incoming::Other => {}
                    }
                }
                due = async { send_rx.as_mut()?.recv().await }, if senders_open => {
                    let Some(due_ns) = due else {
                        senders_open = false;
                        continue;
                    };
                    let reference = next_ref;
                    next_ref += 1;
                    pending.push_back((reference, due_ns));
                    let frame = self.dialect.send(
                        &self.topic,
                        join_ref(self.dialect),
                        reference,
                        &content(due_ns, plan.payload_bytes),
                    );
                    if self.ws.send(Message::text(frame)).await.is_err() {
                        stats.bump(|s| &s.closed);
                        return;
                    }
                }
                _ = beat.tick() => {
                    if let Some(hb) = self.dialect.heartbeat() {
                        if self.ws.send(Message::text(hb)).await.is_err() {
                            stats.bump(|s| &s.closed);
                            return;
                        }
                    }
                }
            }
        }
    }
}
