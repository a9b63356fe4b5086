//! The `huddle` scenario: rooms of `--participants` devices (each a user
//! with its own socket and `deviceId`), all members of the room's
//! conversation; one task per room drives every socket of it.
//!
//! Setup, per room: participant 0 joins `huddle:lobby` and pushes
//! `huddle:create {conversationId}`; then each participant in turn joins
//! `huddle:<id>` (`{audio: true, video: false}`) and keeps the reply's
//! `version`. Joins are one at a time so that every receiver's versions
//! start gap-free.
//!
//! Load: the pacer hands the room its due pushes; the room gives them to its
//! participants round-robin, each participant alternating (in the ratio of
//! `--toggle-share`) between
//! - `huddle:toggle-audio {enabled}`, `enabled` the opposite of its audio:
//!   every participant, the toggler included, should get
//!   `huddle:participant:updated {participant, version}`;
//! - `webrtc:ice-candidate {to, toDeviceId, candidate}` to a random other
//!   participant, the send time in the candidate's foundation and the target
//!   device in its `usernameFragment`.
//!
//! Timing a broadcast: its payload is the server's (no field of ours), so a
//! toggle is keyed by its version. A participant has at most one toggle in
//! flight (a due toggle waits for the previous one's reply: the toggle lag),
//! so the first `participant:updated` of that device with the new `audio`
//! value is that toggle's, whichever socket gets it first; it fixes the
//! toggle's version (so does the reply, whichever comes first, and the two
//! must agree), and every later receipt is matched by version. Latency is
//! from the push's send time to each receipt.
//!
//! Correctness, at every socket: each `huddle:participant:*` event must
//! carry exactly the version after the last one it saw (from its join
//! reply; its own `joined` echo, with the reply's version, excepted, and
//! events of versions before its join, which the gateway may deliver once
//! it subscribed and the protocol has clients drop: counted as stale). A gap,
//! a regression, a toggle reply whose version differs from its broadcast's,
//! an `updated` whose `audio` is not the toggle's, or a relay at a socket
//! other than its target is a violation, counted and named in the errors.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll, SplitSink};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use super::{connect, now_ns, Plan, Ws, CONNECT_TIMEOUT};
use crate::dialect::Dialect;
use crate::layout::{Conversation, Layout, HUDDLE_LOBBY};
use crate::stats::{HuddleLatency, Stats};

/// Join ref of the creator's `huddle:lobby` channel.
const LOBBY_REF: u64 = 1;
/// Join ref of every participant's `huddle:<id>` channel; pushes follow.
const ROOM_REF: u64 = 2;
/// Due pushes a room holds before the pacer skips more.
const ROOM_QUEUE: usize = 256;
/// Due toggles a participant holds while its previous one is unanswered.
const TOGGLE_QUEUE: usize = 4;
/// A push unanswered for this long is given up (an error).
const STALL: Duration = Duration::from_secs(10);
/// How long a toggle waits for all its broadcasts before it is forgotten
/// (the missing ones show as drops).
const TOGGLE_KEEP: Duration = Duration::from_secs(10);
/// Violations a worker prints in full (all are counted).
const SHOWN_VIOLATIONS: u64 = 10;

/// Opens the worker's rooms (connect, create, join), each then driven by
/// its own task; returns the rooms' queues of due pushes.
pub(super) async fn open(
    plan: &Arc<Plan>,
    layout: &Arc<Layout>,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
) -> Vec<mpsc::Sender<u64>> {
    let size = plan.group_max.max(1);
    // A permit opens a room: `size` connections.
    let gate = Arc::new(Semaphore::new((plan.connect_concurrency / size).max(1)));
    let mut joins = Vec::new();
    for (k, conversation) in layout.conversations.iter().enumerate() {
        if conversation.first < plan.start || conversation.first >= plan.end {
            continue;
        }
        let conversation = conversation.clone();
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
            let opened = setup(&plan, &layout, &stats, &conversation, k as u64).await;
            drop(permit);
            let Some((mut room, streams)) = opened else {
                let _ = ready_tx.send(None);
                return;
            };
            for _ in 0..room.members.len() {
                stats.bump(|s| &s.connected);
            }
            stats.bump(|s| &s.huddle.rooms);
            let (tx, rx) = mpsc::channel(ROOM_QUEUE);
            let _ = ready_tx.send(Some(tx));
            room.serve(&plan, &stats, streams, rx, stop).await;
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

/// Every socket's frames, tagged with its member; `None` once it ended.
type Incoming = BoxStream<'static, (usize, Option<Result<Message, tungstenite::Error>>)>;

/// Connects every participant of `conversation`, creates its huddle and
/// joins everyone; a failure is counted and recorded, and the room is lost.
async fn setup(
    plan: &Plan,
    layout: &Layout,
    stats: &Stats,
    conversation: &Conversation,
    seed: u64,
) -> Option<(Room, SelectAll<Incoming>)> {
    let indices: Vec<usize> =
        (conversation.first..conversation.first + conversation.size).collect();
    let opened = futures::future::join_all(indices.iter().map(|&i| connect(plan, layout, i))).await;
    let mut sockets = Vec::with_capacity(opened.len());
    for result in opened {
        match result {
            Ok(ws) => sockets.push(ws),
            Err(e) => {
                stats.bump(|s| &s.connect_errors);
                stats.error(&format!("connect: {}", e.root_cause()));
            }
        }
    }
    if sockets.len() < indices.len() || sockets.is_empty() {
        return None;
    }
    // Frames a socket got while waiting for a reply, handled once serving.
    let mut early: Vec<Vec<String>> = vec![Vec::new(); sockets.len()];
    let huddle_id = match create(&mut sockets[0], &conversation.id, &mut early[0]).await {
        Ok(id) => id,
        Err(e) => {
            stats.bump(|s| &s.join_errors);
            stats.error(&format!("huddle:create: {}", e.root_cause()));
            return None;
        }
    };
    let topic = format!("huddle:{huddle_id}");
    let mut versions = Vec::with_capacity(sockets.len());
    for (k, ws) in sockets.iter_mut().enumerate() {
        match join(ws, &topic, &mut early[k]).await {
            Ok(version) => versions.push(version),
            Err(e) => {
                stats.bump(|s| &s.join_errors);
                stats.error(&format!("join huddle: {}", e.root_cause()));
                return None;
            }
        }
    }
    let mut streams = SelectAll::new();
    let mut members = Vec::with_capacity(sockets.len());
    for (k, ws) in sockets.into_iter().enumerate() {
        let (sink, stream) = ws.split();
        let end = futures::stream::once(async move { (k, None) });
        streams.push(stream.map(move |m| (k, Some(m))).chain(end).boxed());
        members.push(Member {
            sink,
            user: layout.user(indices[k]),
            device: layout.device(indices[k]),
            version: versions[k],
            joined_at: versions[k],
            audio: true,
            toggling: false,
            queued: VecDeque::new(),
            pushes: 0,
            closed: false,
        });
    }
    let by_user = members
        .iter()
        .enumerate()
        .map(|(k, m)| (m.user.clone(), k))
        .collect();
    let mut room = Room {
        members,
        by_user,
        topic,
        pending: HashMap::new(),
        toggles: VecDeque::new(),
        next_ref: ROOM_REF + 1,
        next_toggle: 0,
        next_member: 0,
        rng: 0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1,
        toggle_share: plan.toggle_share,
    };
    for (k, frames) in early.into_iter().enumerate() {
        for frame in frames {
            room.on_frame(k, &frame, stats).await;
        }
    }
    Some((room, streams))
}

/// Sends `frame` and reads until the reply of `reference`, keeping the
/// other frames in `early`; the reply's `response`, or its reason.
async fn request(
    ws: &mut Ws,
    frame: String,
    reference: u64,
    early: &mut Vec<String>,
) -> anyhow::Result<Value> {
    ws.send(Message::text(frame)).await?;
    timeout(CONNECT_TIMEOUT, async {
        while let Some(msg) = ws.next().await {
            let Message::Text(text) = msg? else {
                continue;
            };
            if let Event::Reply {
                reference: r, ok, ..
            } = parse(text.as_str())
            {
                if r == reference {
                    let mut v: Value = serde_json::from_str(text.as_str())?;
                    let response = v[4]["response"].take();
                    if !ok {
                        anyhow::bail!(
                            "refused: {}",
                            response["reason"].as_str().unwrap_or("error reply")
                        );
                    }
                    return Ok(response);
                }
            }
            early.push(text.as_str().to_owned());
        }
        anyhow::bail!("closed by the server")
    })
    .await
    .map_err(|_| anyhow::anyhow!("no reply in time"))?
}

/// Joins `huddle:lobby` and creates the conversation's huddle: its id.
async fn create(
    ws: &mut Ws,
    conversation_id: &str,
    early: &mut Vec<String>,
) -> anyhow::Result<String> {
    let r = LOBBY_REF.to_string();
    let lobby_join = json!([r, r, HUDDLE_LOBBY, "phx_join", {}]).to_string();
    request(ws, lobby_join, LOBBY_REF, early).await?;
    let create = json!([r, "2", HUDDLE_LOBBY, "huddle:create",
        {"conversationId": conversation_id, "title": "bench"}])
    .to_string();
    let reply = request(ws, create, 2, early).await?;
    reply["huddle"]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("huddle:create reply without huddle.id"))
}

/// Joins `topic` as a participant: the reply's version.
async fn join(ws: &mut Ws, topic: &str, early: &mut Vec<String>) -> anyhow::Result<u64> {
    let r = ROOM_REF.to_string();
    let frame = json!([r, r, topic, "phx_join", {"audio": true, "video": false}]).to_string();
    let reply = request(ws, frame, ROOM_REF, early).await?;
    reply["version"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("join reply without version"))
}

/// One participant: its socket's sending half and what it knows.
struct Member {
    sink: SplitSink<Ws, Message>,
    user: String,
    device: String,
    /// The version of this receiver's participant list.
    version: u64,
    /// Its join's version (its own `joined` echo carries it).
    joined_at: u64,
    /// Its audio as of its last answered toggle.
    audio: bool,
    /// A toggle of its is unanswered.
    toggling: bool,
    /// Due times of toggles waiting for that answer.
    queued: VecDeque<u64>,
    /// Pushes handed to it, for the toggle / relay split.
    pushes: u64,
    closed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Push {
    Toggle,
    Relay,
}

impl Push {
    fn event(self) -> &'static str {
        match self {
            Push::Toggle => "huddle:toggle-audio",
            Push::Relay => "webrtc:ice-candidate",
        }
    }
}

/// A push waiting for its reply.
struct Pending {
    member: usize,
    push: Push,
    sent_ns: u64,
    /// The toggle's id.
    toggle: u64,
}

/// A toggle whose broadcasts are still arriving.
struct Toggle {
    id: u64,
    member: usize,
    value: bool,
    sent_ns: u64,
    /// Its commit's version, once its reply or first broadcast told it.
    version: Option<u64>,
    /// `participant:updated` of it received so far (every participant
    /// should get one).
    seen: usize,
    replied: bool,
}

struct Room {
    members: Vec<Member>,
    by_user: HashMap<String, usize>,
    topic: String,
    /// By ref (refs are unique in the room).
    pending: HashMap<u64, Pending>,
    toggles: VecDeque<Toggle>,
    next_ref: u64,
    next_toggle: u64,
    next_member: usize,
    rng: u64,
    toggle_share: f64,
}

impl Room {
    async fn serve(
        &mut self,
        plan: &Plan,
        stats: &Stats,
        mut streams: SelectAll<Incoming>,
        mut due: mpsc::Receiver<u64>,
        stop: CancellationToken,
    ) {
        let heartbeat = Duration::from_millis(plan.heartbeat_ms.max(1000));
        let phase = heartbeat.mul_f64((now_ns() % 1000) as f64 / 1000.0);
        let mut beat = tokio::time::interval_at(Instant::now() + phase, heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut due_open = true;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                msg = streams.next(), if !streams.is_empty() => {
                    let Some((m, msg)) = msg else { continue };
                    match msg {
                        Some(Ok(Message::Text(text))) => {
                            self.on_frame(m, text.as_str(), stats).await;
                        }
                        Some(Ok(Message::Close(_)) | Err(_)) | None => self.lost(m, stats),
                        Some(Ok(_)) => {}
                    }
                }
                d = due.recv(), if due_open => match d {
                    Some(due_ns) => self.on_due(due_ns, stats).await,
                    None => due_open = false,
                },
                _ = sweep.tick() => self.sweep(stats).await,
                _ = beat.tick() => {
                    if let Some(hb) = Dialect::Phoenix.heartbeat() {
                        for m in 0..self.members.len() {
                            self.send(m, hb.to_owned(), stats).await;
                        }
                    }
                }
            }
        }
    }

    /// Member `m`'s socket closed or failed.
    fn lost(&mut self, m: usize, stats: &Stats) {
        let member = &mut self.members[m];
        if !member.closed {
            member.closed = true;
            stats.bump(|s| &s.closed);
            stats.error("socket closed");
        }
    }

    /// Sends a frame on member `m`'s socket; false if it is (now) closed.
    async fn send(&mut self, m: usize, frame: String, stats: &Stats) -> bool {
        if self.members[m].closed {
            return false;
        }
        if self.members[m]
            .sink
            .send(Message::text(frame))
            .await
            .is_err()
        {
            self.lost(m, stats);
            return false;
        }
        true
    }

    /// Counts a correctness violation under `kind`; the first few are also
    /// printed with their details.
    fn violation(&self, stats: &Stats, kind: &str, detail: &str) {
        stats.error(&format!("VIOLATION {kind}"));
        let seen = stats
            .huddle
            .violations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if seen < SHOWN_VIOLATIONS {
            eprintln!("bench worker: VIOLATION {kind}: {detail} ({})", self.topic);
        }
    }

    /// The pacer's push: the next participant, a toggle or a relay.
    async fn on_due(&mut self, due_ns: u64, stats: &Stats) {
        let n = self.members.len();
        let m = self.next_member;
        self.next_member = (m + 1) % n;
        let member = &mut self.members[m];
        if member.closed {
            stats.bump(|s| &s.send_skipped);
            return;
        }
        let c = member.pushes;
        member.pushes += 1;
        let share = self.toggle_share;
        let toggle = ((c + 1) as f64 * share).floor() > (c as f64 * share).floor();
        if !toggle {
            self.relay(m, stats).await;
        } else if member.toggling {
            if member.queued.len() < TOGGLE_QUEUE {
                member.queued.push_back(due_ns);
            } else {
                stats.bump(|s| &s.send_skipped);
            }
        } else {
            self.toggle(m, due_ns, stats).await;
        }
    }

    fn take_ref(&mut self) -> u64 {
        let r = self.next_ref;
        self.next_ref += 1;
        r
    }

    async fn toggle(&mut self, m: usize, due_ns: u64, stats: &Stats) {
        let reference = self.take_ref();
        let id = self.next_toggle;
        self.next_toggle += 1;
        let value = !self.members[m].audio;
        let frame = json!([ROOM_REF.to_string(), reference.to_string(), self.topic,
            Push::Toggle.event(), {"enabled": value}])
        .to_string();
        let sent_ns = now_ns();
        stats.huddle.record(
            HuddleLatency::ToggleLag,
            sent_ns.saturating_sub(due_ns) / 1000,
        );
        self.toggles.push_back(Toggle {
            id,
            member: m,
            value,
            sent_ns,
            version: None,
            seen: 0,
            replied: false,
        });
        self.pending.insert(
            reference,
            Pending {
                member: m,
                push: Push::Toggle,
                sent_ns,
                toggle: id,
            },
        );
        self.members[m].toggling = true;
        stats.bump(|s| &s.huddle.toggles);
        self.send(m, frame, stats).await;
    }

    async fn relay(&mut self, m: usize, stats: &Stats) {
        let n = self.members.len();
        // A random other participant still connected.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let start = (self.rng % (n as u64 - 1).max(1)) as usize;
        let Some(to) = (0..n - 1)
            .map(|k| (m + 1 + (start + k) % (n - 1)) % n)
            .find(|&t| !self.members[t].closed)
        else {
            stats.bump(|s| &s.send_skipped);
            return;
        };
        let reference = self.take_ref();
        let sent_ns = now_ns();
        let target = &self.members[to];
        let payload = json!({
            "to": target.user,
            "toDeviceId": target.device,
            "candidate": candidate(sent_ns, &target.device),
        });
        let frame = json!([
            ROOM_REF.to_string(),
            reference.to_string(),
            self.topic,
            Push::Relay.event(),
            payload
        ])
        .to_string();
        self.pending.insert(
            reference,
            Pending {
                member: m,
                push: Push::Relay,
                sent_ns,
                toggle: 0,
            },
        );
        stats.bump(|s| &s.huddle.relays_sent);
        self.send(m, frame, stats).await;
    }

    /// Member `m`'s toggle was answered (or given up): its next waiting
    /// toggle goes.
    async fn toggle_done(&mut self, m: usize, stats: &Stats) {
        self.members[m].toggling = false;
        if let Some(due_ns) = self.members[m].queued.pop_front() {
            self.toggle(m, due_ns, stats).await;
        }
    }

    async fn on_frame(&mut self, m: usize, text: &str, stats: &Stats) {
        match parse(text) {
            Event::Reply {
                reference,
                ok,
                version,
                reason,
            } => {
                self.on_reply(m, reference, ok, version, reason, stats)
                    .await
            }
            Event::Participant {
                kind,
                user_id,
                device_id,
                audio,
                version,
            } => {
                self.check_version(m, kind, &user_id, &device_id, version, stats);
                match kind {
                    Kind::Updated => self.on_updated(&user_id, audio, version, stats),
                    Kind::Left => stats.error("huddle:participant:left during the run"),
                    Kind::Joined => {}
                }
            }
            Event::Relay {
                from,
                to_device,
                sent_ns,
            } => {
                let micros = sent_ns.map_or(0, |sent| now_ns().saturating_sub(sent) / 1000);
                stats.huddle.record(HuddleLatency::Relay, micros);
                stats.bump(|s| &s.huddle.relays);
                stats.delivery(micros);
                let me = &self.members[m];
                if to_device.as_deref() != Some(me.device.as_str()) {
                    let what = format!(
                        "from {from} for {} delivered to {}",
                        to_device.as_deref().unwrap_or("?"),
                        me.device
                    );
                    self.violation(stats, "relay at the wrong socket", &what);
                }
            }
            Event::ChannelLost(event) => stats.error(&format!("huddle channel {event}")),
            Event::Ended => stats.error("huddle:ended"),
            Event::Other => {}
        }
    }

    async fn on_reply(
        &mut self,
        m: usize,
        reference: u64,
        ok: bool,
        version: Option<u64>,
        reason: Option<String>,
        stats: &Stats,
    ) {
        let Some(p) = self.pending.remove(&reference) else {
            return;
        };
        if p.member != m {
            let what = format!("ref {reference} of participant {} at {m}", p.member);
            self.violation(stats, "reply on another participant's socket", &what);
        }
        let micros = now_ns().saturating_sub(p.sent_ns) / 1000;
        let n = self.members.len() as u64;
        if ok {
            let (expected, which) = match p.push {
                Push::Toggle => (n, HuddleLatency::ToggleReply),
                Push::Relay => (1, HuddleLatency::RelayReply),
            };
            stats.ack(micros, expected);
            stats.huddle.record(which, micros);
        } else {
            stats.bump(|s| &s.acks_error);
            stats.error(&format!(
                "{}: {}",
                p.push.event(),
                reason.as_deref().unwrap_or("error reply")
            ));
        }
        if p.push != Push::Toggle {
            return;
        }
        let at = self.toggles.iter().position(|t| t.id == p.toggle);
        match (ok, at) {
            (true, Some(at)) => {
                let t = &mut self.toggles[at];
                t.replied = true;
                let value = t.value;
                let mismatch = match (version, t.version) {
                    (Some(v), Some(w)) if v != w => Some((
                        "toggle reply version is not its broadcast's",
                        format!("reply {v}, participant:updated {w}"),
                    )),
                    (Some(v), None) => {
                        t.version = Some(v);
                        None
                    }
                    (None, _) => Some(("toggle reply without version", String::new())),
                    _ => None,
                };
                if let Some((kind, what)) = mismatch {
                    self.violation(stats, kind, &what);
                }
                self.members[m].audio = value;
            }
            (true, None) => {}
            // Not applied: forget it, its broadcast will not come.
            (false, Some(at)) => {
                self.toggles.remove(at);
            }
            (false, None) => {}
        }
        self.toggle_done(p.member, stats).await;
    }

    /// Every `huddle:participant:*` event at member `m` must carry the
    /// version after the last it saw.
    fn check_version(
        &mut self,
        m: usize,
        kind: Kind,
        user_id: &str,
        device_id: &str,
        version: u64,
        stats: &Stats,
    ) {
        let me = &mut self.members[m];
        let own_echo = kind == Kind::Joined
            && user_id == me.user
            && device_id == me.device
            && version == me.joined_at;
        if own_echo {
            return;
        }
        let last = me.version;
        if version == last + 1 {
            me.version = version;
            return;
        }
        if version <= me.joined_at {
            // From before its join, delivered after it subscribed: the
            // protocol has clients drop these (counted, not a violation).
            stats.bump(|s| &s.huddle.stale);
            return;
        }
        me.version = me.version.max(version);
        let what = if version <= last {
            "version not increasing at a receiver"
        } else {
            "version gap at a receiver"
        };
        let detail = format!(
            "{} got v{version} ({} of {user_id}) right after v{last}",
            self.members[m].device,
            kind.event()
        );
        self.violation(stats, what, &detail);
    }

    fn on_updated(&mut self, user_id: &str, audio: bool, version: u64, stats: &Stats) {
        let Some(&who) = self.by_user.get(user_id) else {
            stats.bump(|s| &s.huddle.unmatched);
            stats.bump(|s| &s.deliveries);
            return;
        };
        // By version once known; else the participant's toggle in flight
        // with this value (one at a time per participant).
        let at = self
            .toggles
            .iter()
            .position(|t| t.member == who && t.version == Some(version))
            .or_else(|| {
                self.toggles
                    .iter()
                    .position(|t| t.member == who && t.version.is_none() && t.value == audio)
            });
        let Some(at) = at else {
            stats.bump(|s| &s.huddle.unmatched);
            stats.bump(|s| &s.deliveries);
            return;
        };
        let n = self.members.len();
        let t = &mut self.toggles[at];
        t.version.get_or_insert(version);
        t.seen += 1;
        let micros = now_ns().saturating_sub(t.sent_ns) / 1000;
        let wrong = t.value != audio;
        let value = t.value;
        if t.replied && t.seen >= n {
            self.toggles.remove(at);
        }
        stats.huddle.record(HuddleLatency::Broadcast, micros);
        stats.bump(|s| &s.huddle.updates);
        stats.delivery(micros);
        if wrong {
            let what = format!("v{version} of {user_id}: audio {audio}, toggled to {value}");
            self.violation(stats, "participant:updated unlike its toggle", &what);
        }
    }

    /// Gives up pushes unanswered for [`STALL`] and forgets toggles whose
    /// broadcasts are done or overdue.
    async fn sweep(&mut self, stats: &Stats) {
        let now = now_ns();
        let stall = STALL.as_nanos() as u64;
        let stalled: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.sent_ns) > stall)
            .map(|(r, _)| *r)
            .collect();
        for reference in stalled {
            let Some(p) = self.pending.remove(&reference) else {
                continue;
            };
            stats.error(&format!("{}: no reply in {:?}", p.push.event(), STALL));
            if p.push == Push::Toggle {
                self.toggles.retain(|t| t.id != p.toggle);
                self.toggle_done(p.member, stats).await;
            }
        }
        let keep = TOGGLE_KEEP.as_nanos() as u64;
        let n = self.members.len();
        self.toggles.retain(|t| {
            !(t.replied && t.seen >= n) && now.saturating_sub(t.sent_ns) <= keep + stall
        });
    }
}

/// A host candidate whose foundation is the send time and whose
/// `usernameFragment` names the device it is for.
fn candidate(sent_ns: u64, to_device: &str) -> Value {
    json!({
        "candidate": format!("candidate:{sent_ns} 1 udp 2122260223 127.0.0.1 50000 typ host"),
        "sdpMid": "0",
        "sdpMLineIndex": 0,
        "usernameFragment": to_device,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Joined,
    Left,
    Updated,
}

impl Kind {
    fn event(self) -> &'static str {
        match self {
            Kind::Joined => "joined",
            Kind::Left => "left",
            Kind::Updated => "updated",
        }
    }
}

/// What a frame on a huddle socket means.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Reply {
        reference: u64,
        ok: bool,
        version: Option<u64>,
        reason: Option<String>,
    },
    Participant {
        kind: Kind,
        user_id: String,
        device_id: String,
        audio: bool,
        version: u64,
    },
    Relay {
        from: String,
        to_device: Option<String>,
        sent_ns: Option<u64>,
    },
    /// `phx_error` / `phx_close` on a channel.
    ChannelLost(String),
    Ended,
    Other,
}

#[derive(Deserialize)]
struct Reply {
    status: String,
    #[serde(default)]
    response: Option<ReplyBody>,
}

#[derive(Deserialize, Default)]
struct ReplyBody {
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
struct ParticipantEvent {
    participant: ParticipantView,
    version: u64,
}

#[derive(Deserialize)]
struct ParticipantView {
    #[serde(rename = "userId")]
    user_id: String,
    #[serde(rename = "deviceId")]
    device_id: String,
    audio: bool,
}

#[derive(Deserialize)]
struct RelayEvent {
    from: String,
    candidate: CandidateIn,
}

#[derive(Deserialize)]
struct CandidateIn {
    candidate: String,
    #[serde(rename = "usernameFragment", default)]
    username_fragment: Option<String>,
}

/// The send time in a candidate's foundation (`candidate:<nanos> …`).
fn stamp_in(candidate: &str) -> Option<u64> {
    let rest = candidate.strip_prefix("candidate:")?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn parse(text: &str) -> Event {
    type Frame<'a> = (
        Option<&'a str>,
        Option<&'a str>,
        &'a str,
        &'a str,
        &'a RawValue,
    );
    let Ok((_join_ref, reference, _topic, event, payload)) = serde_json::from_str::<Frame>(text)
    else {
        return Event::Other;
    };
    let kind = match event {
        "huddle:participant:joined" => Some(Kind::Joined),
        "huddle:participant:left" => Some(Kind::Left),
        "huddle:participant:updated" => Some(Kind::Updated),
        _ => None,
    };
    if let Some(kind) = kind {
        return match serde_json::from_str::<ParticipantEvent>(payload.get()) {
            Ok(e) => Event::Participant {
                kind,
                user_id: e.participant.user_id,
                device_id: e.participant.device_id,
                audio: e.participant.audio,
                version: e.version,
            },
            Err(_) => Event::Other,
        };
    }
    match event {
        "phx_reply" => {
            let Some(reference) = reference.and_then(|r| r.parse().ok()) else {
                return Event::Other;
            };
            match serde_json::from_str::<Reply>(payload.get()) {
                Ok(reply) => {
                    let body = reply.response.unwrap_or_default();
                    Event::Reply {
                        reference,
                        ok: reply.status == "ok",
                        version: body.version,
                        reason: body.reason,
                    }
                }
                Err(_) => Event::Reply {
                    reference,
                    ok: false,
                    version: None,
                    reason: Some("unreadable reply".into()),
                },
            }
        }
        "webrtc:ice-candidate" => match serde_json::from_str::<RelayEvent>(payload.get()) {
            Ok(r) => Event::Relay {
                from: r.from,
                sent_ns: stamp_in(&r.candidate.candidate),
                to_device: r.candidate.username_fragment,
            },
            Err(_) => Event::Other,
        },
        "huddle:ended" => Event::Ended,
        "phx_error" | "phx_close" => Event::ChannelLost(event.to_owned()),
        _ => Event::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_participant_events_parse() {
        let ok = r#"["2","7","huddle:h1","phx_reply",{"status":"ok","response":{"version":12}}]"#;
        assert_eq!(
            parse(ok),
            Event::Reply {
                reference: 7,
                ok: true,
                version: Some(12),
                reason: None
            }
        );
        let err = r#"["2","8","huddle:h1","phx_reply",{"status":"error","response":{"reason":"forbidden"}}]"#;
        assert_eq!(
            parse(err),
            Event::Reply {
                reference: 8,
                ok: false,
                version: None,
                reason: Some("forbidden".into())
            }
        );
        let hb = r#"[null,"hb","phoenix","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(parse(hb), Event::Other);
        let updated = r#"[null,null,"huddle:h1","huddle:participant:updated",{"participant":{"userId":"u1","deviceId":"d1","audio":false,"video":false,"screen":false,"handRaised":false,"joinedAt":"2025-01-01T00:00:00.000Z"},"version":9}]"#;
        assert_eq!(
            parse(updated),
            Event::Participant {
                kind: Kind::Updated,
                user_id: "u1".into(),
                device_id: "d1".into(),
                audio: false,
                version: 9
            }
        );
        let left = r#"[null,null,"huddle:h1","huddle:participant:left",{"userId":"u1","deviceId":"d1","participant":{"userId":"u1","deviceId":"d1","audio":true,"video":false,"screen":false,"handRaised":false,"joinedAt":"x"},"version":10}]"#;
        assert!(matches!(
            parse(left),
            Event::Participant {
                kind: Kind::Left,
                version: 10,
                ..
            }
        ));
    }

    #[test]
    fn relays_carry_their_send_time_and_target() {
        let relay = json!([null, null, "huddle:h1", "webrtc:ice-candidate",
            {"from": "u0", "fromDeviceId": "d0", "candidate": candidate(123_456, "d3")}])
        .to_string();
        assert_eq!(
            parse(&relay),
            Event::Relay {
                from: "u0".into(),
                to_device: Some("d3".into()),
                sent_ns: Some(123_456)
            }
        );
        assert_eq!(stamp_in("candidate:42 1 udp"), Some(42));
        assert_eq!(stamp_in("foundation"), None);
    }
}
