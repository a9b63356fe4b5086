//! The `calls` scenario: connection 2k (the caller) calls connection 2k+1
//! (the callee), both joined to `webrtc:lobby`, one call at a time per pair.
//!
//! One task drives both sockets of a pair, so it knows when each push was
//! sent. A call, once the pacer hands the pair a due call:
//!
//! 1. the caller pushes `call:initiate {calleeId, callType}`;
//! 2. the callee, on `call:incoming`, pushes `call:answer {callId}`;
//! 3. the caller, on `call:answered`, pushes `webrtc:offer {callId, sdp}` and
//!    `--ice-candidates` × `webrtc:ice-candidate {callId, candidate}`;
//! 4. the callee, on the relayed offer, pushes `webrtc:answer` and as many
//!    candidates;
//! 5. once each party has every relay of the other, the caller pushes
//!    `call:end`; the call is over when both have `call:ended`.
//!
//! Timed (all on the shared wall clock, [`now_ns`]): ring (initiate sent →
//! `call:incoming` at the callee), answered (answer sent → `call:answered` at
//! the caller), setup (initiate sent → `call:answered`), relay (each offer,
//! answer and candidate: pushed → relayed, the send time travels inside the
//! SDP's `o=` line and the candidate's foundation), ended (end sent →
//! `call:ended`, each party), and the start lag (call due → initiate sent:
//! a pair still busy with its previous call makes the next one wait, in a
//! queue of [`CALL_QUEUE`]; beyond that the pacer skips it, counted).
//!
//! A call that gets an error reply, an unexpected `call:ended` or no
//! progress within [`STALL`] is failed: the caller ends it (if it has an id)
//! and the pair moves on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{join_ref, now_ns, open_one, Plan, Ws};
use crate::dialect::Dialect;
use crate::layout::{Layout, CALLS_TOPIC};
use crate::stats::{CallLatency, Stats};

/// Due calls a busy pair holds before the pacer skips more.
const CALL_QUEUE: usize = 4;
/// A call with no step done within this is failed.
const STALL: Duration = Duration::from_secs(10);
/// After `call:end`, how long to wait for `call:ended`.
const END_GRACE: Duration = Duration::from_secs(5);

/// Opens the worker's pairs (both sockets, joined to `webrtc:lobby`), each
/// then driven by its own task; returns the callers' queues of due calls.
pub(super) async fn open(
    plan: &Arc<Plan>,
    layout: &Arc<Layout>,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
) -> Vec<mpsc::Sender<u64>> {
    // A permit opens a pair: two connections.
    let gate = Arc::new(Semaphore::new((plan.connect_concurrency / 2).max(1)));
    let mut joins = Vec::new();
    for caller in (plan.start..plan.end).step_by(2) {
        let callee = caller + 1;
        if callee >= plan.end || !layout.is_sender(caller) {
            continue;
        }
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
            let (a, b) = tokio::join!(
                open_one(&plan, &layout, &stats, caller),
                open_one(&plan, &layout, &stats, callee)
            );
            drop(permit);
            let (Some(a), Some(b)) = (a, b) else {
                let _ = ready_tx.send(None);
                return;
            };
            stats.bump(|s| &s.connected);
            stats.bump(|s| &s.connected);
            let (tx, rx) = mpsc::channel(CALL_QUEUE);
            let _ = ready_tx.send(Some(tx));
            let mut pair = Pair {
                caller: Party::new(a.ws, layout.user(caller)),
                callee: Party::new(b.ws, layout.user(callee)),
                call: None,
                seq: 0,
                ice: plan.ice_candidates,
                call_type: plan.call_type.as_str(),
                padding: plan.payload_bytes,
            };
            pair.serve(&plan, &stats, rx, stop).await;
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

/// A push of the scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Push {
    Initiate,
    Answer,
    Offer,
    SdpAnswer,
    Ice,
    End,
}

impl Push {
    fn event(self) -> &'static str {
        match self {
            Push::Initiate => "call:initiate",
            Push::Answer => "call:answer",
            Push::Offer => "webrtc:offer",
            Push::SdpAnswer => "webrtc:answer",
            Push::Ice => "webrtc:ice-candidate",
            Push::End => "call:end",
        }
    }

    /// Events an accepted push should cause: one to the other party, two
    /// `call:ended` for `call:end`.
    fn deliveries(self) -> u64 {
        match self {
            Push::End => 2,
            _ => 1,
        }
    }
}

/// A push waiting for its reply.
struct Pending {
    reference: u64,
    push: Push,
    /// The call it belongs to.
    seq: u64,
    sent_ns: u64,
}

/// The socket was closed or failed.
struct Closed;

/// One user's socket.
struct Party {
    ws: Ws,
    user: String,
    next_ref: u64,
    pending: VecDeque<Pending>,
}

impl Party {
    fn new(ws: Ws, user: String) -> Party {
        Party {
            ws,
            user,
            next_ref: join_ref(Dialect::Phoenix) + 1,
            pending: VecDeque::new(),
        }
    }

    /// Queues a push without flushing (see [`Party::flush`]).
    async fn feed(&mut self, push: Push, seq: u64, payload: Value) -> Result<(), Closed> {
        let reference = self.next_ref;
        self.next_ref += 1;
        let frame = json!([
            join_ref(Dialect::Phoenix).to_string(),
            reference.to_string(),
            CALLS_TOPIC,
            push.event(),
            payload
        ])
        .to_string();
        self.pending.push_back(Pending {
            reference,
            push,
            seq,
            sent_ns: now_ns(),
        });
        self.ws.feed(Message::text(frame)).await.map_err(|_| Closed)
    }

    async fn flush(&mut self) -> Result<(), Closed> {
        self.ws.flush().await.map_err(|_| Closed)
    }

    async fn push(&mut self, push: Push, seq: u64, payload: Value) -> Result<(), Closed> {
        self.feed(push, seq, payload).await?;
        self.flush().await
    }

    fn take_pending(&mut self, reference: u64) -> Option<Pending> {
        let at = self.pending.iter().position(|p| p.reference == reference)?;
        self.pending.remove(at)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Caller,
    Callee,
}

/// The call in progress.
struct Call {
    seq: u64,
    id: Option<String>,
    initiated_ns: u64,
    deadline: Instant,
    rang: bool,
    answer_sent_ns: Option<u64>,
    answered: bool,
    /// Relays received: the callee's answer and candidates / the caller's
    /// offer and candidates.
    caller_got: u32,
    callee_got: u32,
    end_sent_ns: Option<u64>,
    caller_ended: bool,
    callee_ended: bool,
    failed: bool,
}

impl Call {
    /// The step the call waits for, for stall reports.
    fn waiting_for(&self, ice: u32) -> &'static str {
        if self.end_sent_ns.is_some() {
            "call:ended"
        } else if !self.rang {
            "call:incoming"
        } else if !self.answered {
            "call:answered"
        } else if self.caller_got < ice + 1 || self.callee_got < ice + 1 {
            "relay"
        } else {
            "call:end"
        }
    }
}

struct Pair {
    caller: Party,
    callee: Party,
    call: Option<Call>,
    seq: u64,
    ice: u32,
    call_type: &'static str,
    padding: usize,
}

impl Pair {
    async fn serve(
        &mut self,
        plan: &Plan,
        stats: &Stats,
        mut calls: mpsc::Receiver<u64>,
        stop: CancellationToken,
    ) {
        let heartbeat = Duration::from_millis(plan.heartbeat_ms.max(1000));
        let phase = heartbeat.mul_f64((now_ns() % 1000) as f64 / 1000.0);
        let mut beat = tokio::time::interval_at(Instant::now() + phase, heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut calls_open = true;
        loop {
            let deadline = self.call.as_ref().map(|c| c.deadline);
            let step = tokio::select! {
                () = stop.cancelled() => return,
                msg = self.caller.ws.next() => self.on_message(Side::Caller, msg, stats).await,
                msg = self.callee.ws.next() => self.on_message(Side::Callee, msg, stats).await,
                due = calls.recv(), if calls_open && self.call.is_none() => match due {
                    Some(due_ns) => self.start(due_ns, stats).await,
                    None => {
                        calls_open = false;
                        Ok(())
                    }
                },
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                    if deadline.is_some() => self.stalled(stats).await,
                _ = beat.tick() => self.heartbeat().await,
            };
            if step.is_err() {
                // The pair is no longer in service: both sockets count.
                stats.bump(|s| &s.closed);
                stats.bump(|s| &s.closed);
                stats.error("socket closed");
                return;
            }
        }
    }

    fn party(&mut self, side: Side) -> &mut Party {
        match side {
            Side::Caller => &mut self.caller,
            Side::Callee => &mut self.callee,
        }
    }

    async fn heartbeat(&mut self) -> Result<(), Closed> {
        if let Some(hb) = Dialect::Phoenix.heartbeat() {
            for party in [&mut self.caller, &mut self.callee] {
                party.ws.send(Message::text(hb)).await.map_err(|_| Closed)?;
            }
        }
        Ok(())
    }

    async fn start(&mut self, due_ns: u64, stats: &Stats) -> Result<(), Closed> {
        self.seq += 1;
        let initiated_ns = now_ns();
        stats.calls.record(
            CallLatency::StartLag,
            initiated_ns.saturating_sub(due_ns) / 1000,
        );
        stats.bump(|s| &s.calls.started);
        self.call = Some(Call {
            seq: self.seq,
            id: None,
            initiated_ns,
            deadline: Instant::now() + STALL,
            rang: false,
            answer_sent_ns: None,
            answered: false,
            caller_got: 0,
            callee_got: 0,
            end_sent_ns: None,
            caller_ended: false,
            callee_ended: false,
            failed: false,
        });
        let payload = json!({"calleeId": self.callee.user, "callType": self.call_type});
        self.caller.push(Push::Initiate, self.seq, payload).await
    }

    async fn on_message(
        &mut self,
        side: Side,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        stats: &Stats,
    ) -> Result<(), Closed> {
        match msg {
            Some(Ok(Message::Text(text))) => self.on_frame(side, text.as_str(), stats).await,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => Err(Closed),
            Some(Ok(_)) => Ok(()),
        }
    }

    async fn on_frame(&mut self, side: Side, text: &str, stats: &Stats) -> Result<(), Closed> {
        match parse(text) {
            Event::Reply {
                reference,
                ok,
                call_id,
                reason,
            } => {
                let Some(p) = self.party(side).take_pending(reference) else {
                    return Ok(());
                };
                let micros = now_ns().saturating_sub(p.sent_ns) / 1000;
                if ok {
                    stats.ack(micros, p.push.deliveries());
                } else {
                    stats.bump(|s| &s.acks_error);
                    stats.error(&format!(
                        "{}: {}",
                        p.push.event(),
                        reason.as_deref().unwrap_or("error reply")
                    ));
                }
                let Some(call) = self.call.as_mut().filter(|c| c.seq == p.seq) else {
                    return Ok(());
                };
                match (p.push, ok) {
                    (Push::Initiate, true) => {
                        if call.id.is_none() {
                            call.id = call_id;
                        }
                        Ok(())
                    }
                    (Push::End, _) if call.failed || !ok => {
                        call.failed = true;
                        self.finish(stats);
                        Ok(())
                    }
                    (_, true) => Ok(()),
                    (_, false) => {
                        call.failed = true;
                        self.end(stats).await
                    }
                }
            }
            Event::Incoming { call_id } if side == Side::Callee => {
                let Some(call) = current(&mut self.call, &call_id).filter(|c| !c.rang) else {
                    stats.bump(|s| &s.deliveries);
                    return Ok(());
                };
                call.rang = true;
                call.id.get_or_insert(call_id);
                call.deadline = Instant::now() + STALL;
                let sent = now_ns();
                let micros = sent.saturating_sub(call.initiated_ns) / 1000;
                stats.calls.record(CallLatency::Ring, micros);
                stats.delivery(micros);
                if call.failed {
                    return Ok(());
                }
                call.answer_sent_ns = Some(sent);
                let (seq, payload) = (call.seq, json!({"callId": call.id}));
                self.callee.push(Push::Answer, seq, payload).await
            }
            Event::Answered { call_id } if side == Side::Caller => {
                let Some(call) = current(&mut self.call, &call_id).filter(|c| !c.answered) else {
                    stats.bump(|s| &s.deliveries);
                    return Ok(());
                };
                call.answered = true;
                call.id.get_or_insert(call_id);
                call.deadline = Instant::now() + STALL;
                let now = now_ns();
                let micros = call
                    .answer_sent_ns
                    .map_or(0, |sent| now.saturating_sub(sent) / 1000);
                stats.calls.record(CallLatency::Answered, micros);
                stats.calls.record(
                    CallLatency::Setup,
                    now.saturating_sub(call.initiated_ns) / 1000,
                );
                stats.bump(|s| &s.calls.setups);
                stats.delivery(micros);
                if call.failed {
                    return Ok(());
                }
                let (seq, id) = (call.seq, call.id.clone());
                let (ice, padding) = (self.ice, self.padding);
                let sent = now_ns();
                let offer = json!({"callId": id, "sdp": sdp(sent, padding)});
                self.caller.feed(Push::Offer, seq, offer).await?;
                for k in 0..ice {
                    let candidate = json!({"callId": id, "candidate": candidate(now_ns(), k)});
                    self.caller.feed(Push::Ice, seq, candidate).await?;
                }
                self.caller.flush().await
            }
            Event::Relay {
                kind,
                call_id,
                sent_ns,
            } => {
                let Some(call) = current(&mut self.call, &call_id) else {
                    stats.bump(|s| &s.deliveries);
                    return Ok(());
                };
                let micros = sent_ns.map_or(0, |sent| now_ns().saturating_sub(sent) / 1000);
                stats.calls.record(CallLatency::Relay, micros);
                stats.bump(|s| &s.calls.relays);
                stats.delivery(micros);
                call.deadline = Instant::now() + STALL;
                match side {
                    Side::Caller => call.caller_got += 1,
                    Side::Callee => call.callee_got += 1,
                }
                let want = self.ice + 1;
                let answer = !call.failed && side == Side::Callee && kind == Relay::Offer;
                let done = !call.failed && call.caller_got >= want && call.callee_got >= want;
                let (seq, id) = (call.seq, call.id.clone());
                if answer {
                    let sdp_answer = json!({"callId": id, "sdp": sdp(now_ns(), self.padding)});
                    self.callee.feed(Push::SdpAnswer, seq, sdp_answer).await?;
                    for k in 0..self.ice {
                        let candidate = json!({"callId": id, "candidate": candidate(now_ns(), k)});
                        self.callee.feed(Push::Ice, seq, candidate).await?;
                    }
                    self.callee.flush().await?;
                }
                if done {
                    self.end(stats).await?;
                }
                Ok(())
            }
            Event::Ended { call_id, reason } => {
                let Some(call) = current(&mut self.call, &call_id) else {
                    stats.bump(|s| &s.deliveries);
                    return Ok(());
                };
                match call.end_sent_ns {
                    Some(sent) => {
                        let micros = now_ns().saturating_sub(sent) / 1000;
                        stats.calls.record(CallLatency::Ended, micros);
                        stats.delivery(micros);
                    }
                    None => {
                        // Ended by the server (or a stray peer), not by us.
                        stats.bump(|s| &s.deliveries);
                        if !call.failed {
                            call.failed = true;
                            stats.error(&format!("call:ended unasked: {reason}"));
                        }
                    }
                }
                match side {
                    Side::Caller => call.caller_ended = true,
                    Side::Callee => call.callee_ended = true,
                }
                // A failed call may never have reached the callee: the
                // caller's `call:ended` closes it.
                if call.caller_ended && (call.callee_ended || call.failed) {
                    self.finish(stats);
                }
                Ok(())
            }
            Event::ChannelLost(event) => {
                stats.error(&format!("webrtc:lobby {event}"));
                Ok(())
            }
            Event::Incoming { .. } | Event::Answered { .. } | Event::Other => Ok(()),
        }
    }

    /// The caller ends the current call (at most once); a call without an id
    /// is simply given up.
    async fn end(&mut self, stats: &Stats) -> Result<(), Closed> {
        let Some(call) = self.call.as_mut() else {
            return Ok(());
        };
        if call.end_sent_ns.is_some() {
            return Ok(());
        }
        let Some(id) = call.id.clone() else {
            self.finish(stats);
            return Ok(());
        };
        call.end_sent_ns = Some(now_ns());
        call.deadline = Instant::now() + END_GRACE;
        let seq = call.seq;
        self.caller
            .push(Push::End, seq, json!({"callId": id}))
            .await
    }

    /// No progress in time: fail the call, end it if it can be.
    async fn stalled(&mut self, stats: &Stats) -> Result<(), Closed> {
        let ice = self.ice;
        let Some(call) = self.call.as_mut() else {
            return Ok(());
        };
        stats.error(&format!("stalled: no {}", call.waiting_for(ice)));
        call.failed = true;
        if call.end_sent_ns.is_none() && call.id.is_some() {
            self.end(stats).await
        } else {
            self.finish(stats);
            Ok(())
        }
    }

    fn finish(&mut self, stats: &Stats) {
        if let Some(call) = self.call.take() {
            if call.failed {
                stats.bump(|s| &s.calls.failed);
            } else {
                stats.bump(|s| &s.calls.completed);
            }
        }
    }
}

/// The call in progress if `call_id` is (or may be: its id is not known
/// yet) its id.
fn current<'a>(call: &'a mut Option<Call>, call_id: &str) -> Option<&'a mut Call> {
    call.as_mut()
        .filter(|c| c.id.as_deref().is_none_or(|id| id == call_id))
}

/// An SDP of a single audio section; `o=`'s session id is the send time.
fn sdp(sent_ns: u64, padding: usize) -> String {
    let mut s = format!(
        "v=0\r\no=bench {sent_ns} 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
         a=group:BUNDLE 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n\
         a=mid:0\r\na=sendrecv\r\na=rtpmap:111 opus/48000/2\r\n"
    );
    if padding > 0 {
        s.push_str("a=x-bench:");
        s.extend(std::iter::repeat_n('x', padding));
        s.push_str("\r\n");
    }
    s
}

/// A host candidate whose foundation is the send time.
fn candidate(sent_ns: u64, k: u32) -> Value {
    json!({
        "candidate": format!(
            "candidate:{sent_ns} 1 udp 2122260223 127.0.0.1 {} typ host",
            50_000 + k
        ),
        "sdpMid": "0",
        "sdpMLineIndex": 0,
    })
}

/// The send time a relayed SDP or candidate carries.
fn stamp_in(payload: &str) -> Option<u64> {
    ["o=bench ", "\"candidate:"].iter().find_map(|key| {
        let at = payload.find(key)? + key.len();
        let rest = &payload[at..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Relay {
    Offer,
    Answer,
    Ice,
}

/// What a frame on a calls socket means.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Reply {
        reference: u64,
        ok: bool,
        call_id: Option<String>,
        reason: Option<String>,
    },
    Incoming {
        call_id: String,
    },
    Answered {
        call_id: String,
    },
    Relay {
        kind: Relay,
        call_id: String,
        sent_ns: Option<u64>,
    },
    Ended {
        call_id: String,
        reason: String,
    },
    /// `phx_error` / `phx_close` on the lobby.
    ChannelLost(String),
    Other,
}

#[derive(Deserialize)]
struct CallRef {
    #[serde(rename = "callId")]
    call_id: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
struct Reply {
    status: String,
    #[serde(default)]
    response: Option<ReplyBody>,
}

#[derive(Deserialize, Default)]
struct ReplyBody {
    #[serde(rename = "callId", default)]
    call_id: Option<String>,
    #[serde(default)]
    reason: Option<String>,
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
    let call = || serde_json::from_str::<CallRef>(payload.get()).ok();
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
                        call_id: body.call_id,
                        reason: body.reason,
                    }
                }
                Err(_) => Event::Reply {
                    reference,
                    ok: false,
                    call_id: None,
                    reason: Some("unreadable reply".into()),
                },
            }
        }
        "call:incoming" => call().map_or(Event::Other, |c| Event::Incoming { call_id: c.call_id }),
        "call:answered" => call().map_or(Event::Other, |c| Event::Answered { call_id: c.call_id }),
        "call:ended" => call().map_or(Event::Other, |c| Event::Ended {
            call_id: c.call_id,
            reason: c.reason.unwrap_or_default(),
        }),
        "webrtc:offer" | "webrtc:answer" | "webrtc:ice-candidate" => {
            let kind = match event {
                "webrtc:offer" => Relay::Offer,
                "webrtc:answer" => Relay::Answer,
                _ => Relay::Ice,
            };
            call().map_or(Event::Other, |c| Event::Relay {
                kind,
                call_id: c.call_id,
                sent_ns: stamp_in(payload.get()),
            })
        }
        "phx_error" | "phx_close" => Event::ChannelLost(event.to_owned()),
        _ => Event::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_call_events_parse() {
        let ok =
            r#"["1","2","webrtc:lobby","phx_reply",{"status":"ok","response":{"callId":"abc"}}]"#;
        assert_eq!(
            parse(ok),
            Event::Reply {
                reference: 2,
                ok: true,
                call_id: Some("abc".into()),
                reason: None
            }
        );
        let busy = r#"["1","3","webrtc:lobby","phx_reply",{"status":"error","response":{"reason":"busy"}}]"#;
        assert_eq!(
            parse(busy),
            Event::Reply {
                reference: 3,
                ok: false,
                call_id: None,
                reason: Some("busy".into())
            }
        );
        let empty = r#"["1","4","webrtc:lobby","phx_reply",{"status":"ok","response":{}}]"#;
        assert!(matches!(parse(empty), Event::Reply { ok: true, .. }));
        let hb = r#"[null,"hb","phoenix","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(parse(hb), Event::Other);
        let incoming = r#"[null,null,"webrtc:lobby","call:incoming",{"callId":"c1","callerId":"u0","callType":"audio","conversationId":null,"createdAt":"2025-01-01T00:00:00.000Z"}]"#;
        assert_eq!(
            parse(incoming),
            Event::Incoming {
                call_id: "c1".into()
            }
        );
        let ended = r#"[null,null,"webrtc:lobby","call:ended",{"callId":"c1","reason":"hangup","endedBy":"u0","durationMs":3}]"#;
        assert_eq!(
            parse(ended),
            Event::Ended {
                call_id: "c1".into(),
                reason: "hangup".into()
            }
        );
    }

    #[test]
    fn relays_carry_their_send_time() {
        let offer = json!([null, null, CALLS_TOPIC, "webrtc:offer",
            {"callId": "c1", "from": "u0", "sdp": sdp(123_456, 4)}])
        .to_string();
        assert_eq!(
            parse(&offer),
            Event::Relay {
                kind: Relay::Offer,
                call_id: "c1".into(),
                sent_ns: Some(123_456)
            }
        );
        let ice = json!([null, null, CALLS_TOPIC, "webrtc:ice-candidate",
            {"callId": "c1", "from": "u1", "candidate": candidate(987, 2)}])
        .to_string();
        assert_eq!(
            parse(&ice),
            Event::Relay {
                kind: Relay::Ice,
                call_id: "c1".into(),
                sent_ns: Some(987)
            }
        );
        assert!(sdp(1, 0).starts_with("v=0\r\n"));
        assert_eq!(Push::End.deliveries(), 2);
        assert_eq!(Push::Ice.event(), "webrtc:ice-candidate");
    }
}
