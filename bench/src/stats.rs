//! What one worker process counts and measures, and how the orchestrator adds
//! the workers' reports together.
//!
//! Latencies go into HDR histograms in microseconds (1 µs – 60 s, 3
//! significant digits) and travel between processes in the V2 serialization,
//! base64-encoded inside the worker's JSON report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

const MAX_MICROS: u64 = 60_000_000;

#[allow(
    clippy::expect_used,
    reason = "constant bounds, checked by every test run"
)]
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

/// Live counters of one worker, shared by its connection tasks.
#[derive(Default)]
pub struct Stats {
    pub connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub join_errors: AtomicU64,
    /// Connect-and-join tries that failed and were tried again.
    pub retried: AtomicU64,
    /// Sockets the server closed (or that failed) while the run was going.
    pub closed: AtomicU64,
    pub sends: AtomicU64,
    /// Sends the pacer could not hand to a connection (its queue was full).
    pub send_skipped: AtomicU64,
    pub acks_ok: AtomicU64,
    pub acks_error: AtomicU64,
    /// Deliveries the acknowledged sends should cause: members per send.
    pub expected_deliveries: AtomicU64,
    pub deliveries: AtomicU64,
    error_reasons: Mutex<BTreeMap<String, u64>>,
    delivery_latency: Mutex<Option<Histogram<u64>>>,
    ack_latency: Mutex<Option<Histogram<u64>>>,
    /// The `calls` scenario's own figures (empty otherwise).
    pub calls: CallStats,
    /// The `huddle` scenario's own figures (empty otherwise).
    pub huddle: HuddleStats,
}

/// What the `calls` scenario counts and times, on top of [`Stats`]' generic
/// counts (there: pushes and their replies, and every call event received as
/// a delivery).
#[derive(Default)]
pub struct CallStats {
    /// `call:initiate` pushes sent.
    pub started: AtomicU64,
    /// Calls set up: the caller got `call:answered`.
    pub setups: AtomicU64,
    /// Calls that went through every step and both parties got `call:ended`.
    pub completed: AtomicU64,
    /// Calls given up: an error reply, an unexpected `call:ended`, a stall.
    pub failed: AtomicU64,
    /// `webrtc:offer` / `webrtc:answer` / `webrtc:ice-candidate` received.
    pub relays: AtomicU64,
    /// `call:initiate` sent → `call:incoming` at the callee.
    ring: Mutex<Option<Histogram<u64>>>,
    /// `call:answer` sent → `call:answered` at the caller.
    answered: Mutex<Option<Histogram<u64>>>,
    /// `call:initiate` sent → `call:answered` at the caller.
    setup: Mutex<Option<Histogram<u64>>>,
    /// A relay pushed → relayed to the other party.
    relay: Mutex<Option<Histogram<u64>>>,
    /// `call:end` sent → `call:ended` at each party.
    ended: Mutex<Option<Histogram<u64>>>,
    /// When the call was due (pacer) → `call:initiate` sent: client queueing.
    start_lag: Mutex<Option<Histogram<u64>>>,
}

/// One of the [`CallStats`] latencies.
#[derive(Clone, Copy, Debug)]
pub enum CallLatency {
    Ring,
    Answered,
    Setup,
    Relay,
    Ended,
    StartLag,
}

impl CallStats {
    pub fn record(&self, which: CallLatency, micros: u64) {
        let slot = match which {
            CallLatency::Ring => &self.ring,
            CallLatency::Answered => &self.answered,
            CallLatency::Setup => &self.setup,
            CallLatency::Relay => &self.relay,
            CallLatency::Ended => &self.ended,
            CallLatency::StartLag => &self.start_lag,
        };
        record(slot, micros);
    }

    fn report(&self) -> anyhow::Result<CallReport> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Ok(CallReport {
            counts: CallCounts {
                started: get(&self.started),
                setups: get(&self.setups),
                completed: get(&self.completed),
                failed: get(&self.failed),
                relays: get(&self.relays),
            },
            ring: hist(&self.ring)?,
            answered: hist(&self.answered)?,
            setup: hist(&self.setup)?,
            relay: hist(&self.relay)?,
            ended: hist(&self.ended)?,
            start_lag: hist(&self.start_lag)?,
        })
    }
}

/// What the `huddle` scenario counts and times, on top of [`Stats`]' generic
/// counts (there: pushes and their replies, and every `participant:updated`
/// and relay received as a delivery).
#[derive(Default)]
pub struct HuddleStats {
    /// Rooms created and joined by all their participants.
    pub rooms: AtomicU64,
    /// `huddle:toggle-audio` pushes sent.
    pub toggles: AtomicU64,
    /// `webrtc:ice-candidate` pushes sent.
    pub relays_sent: AtomicU64,
    /// `huddle:participant:updated` received that a toggle of ours caused.
    pub updates: AtomicU64,
    /// `huddle:participant:updated` received that no toggle of ours matched.
    pub unmatched: AtomicU64,
    /// `webrtc:ice-candidate` relays received.
    pub relays: AtomicU64,
    /// `huddle:participant:*` events of versions before the receiver's join
    /// (delivered after it subscribed; clients drop them).
    pub stale: AtomicU64,
    /// Correctness violations: version gaps or regressions at a receiver, a
    /// toggle reply's version unlike its broadcast's, a relay at the wrong
    /// socket (reasons in the error reasons).
    pub violations: AtomicU64,
    /// Push of a toggle → its reply.
    toggle_reply: Mutex<Option<Histogram<u64>>>,
    /// Push of a relay → its reply.
    relay_reply: Mutex<Option<Histogram<u64>>>,
    /// Push of a toggle → its `participant:updated` at each participant.
    broadcast: Mutex<Option<Histogram<u64>>>,
    /// Push of a relay → received by its target.
    relay: Mutex<Option<Histogram<u64>>>,
    /// A toggle due (pacer) → pushed: waiting for the participant's previous
    /// toggle to be answered.
    toggle_lag: Mutex<Option<Histogram<u64>>>,
}

/// One of the [`HuddleStats`] latencies.
#[derive(Clone, Copy, Debug)]
pub enum HuddleLatency {
    ToggleReply,
    RelayReply,
    Broadcast,
    Relay,
    ToggleLag,
}

impl HuddleStats {
    pub fn record(&self, which: HuddleLatency, micros: u64) {
        let slot = match which {
            HuddleLatency::ToggleReply => &self.toggle_reply,
            HuddleLatency::RelayReply => &self.relay_reply,
            HuddleLatency::Broadcast => &self.broadcast,
            HuddleLatency::Relay => &self.relay,
            HuddleLatency::ToggleLag => &self.toggle_lag,
        };
        record(slot, micros);
    }

    fn report(&self) -> anyhow::Result<HuddleReport> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Ok(HuddleReport {
            counts: HuddleCounts {
                rooms: get(&self.rooms),
                toggles: get(&self.toggles),
                relays_sent: get(&self.relays_sent),
                updates: get(&self.updates),
                unmatched: get(&self.unmatched),
                relays: get(&self.relays),
                stale: get(&self.stale),
                violations: get(&self.violations),
            },
            toggle_reply: hist(&self.toggle_reply)?,
            relay_reply: hist(&self.relay_reply)?,
            broadcast: hist(&self.broadcast)?,
            relay: hist(&self.relay)?,
            toggle_lag: hist(&self.toggle_lag)?,
        })
    }
}

fn hist(slot: &Mutex<Option<Histogram<u64>>>) -> anyhow::Result<String> {
    let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    encode(guard.as_ref().unwrap_or(&histogram()))
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn record(slot: &Mutex<Option<Histogram<u64>>>, micros: u64) {
    let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    guard
        .get_or_insert_with(histogram)
        .saturating_record(micros.max(1));
}

impl Stats {
    pub fn bump(&self, counter: impl Fn(&Stats) -> &AtomicU64) {
        bump(counter(self));
    }

    pub fn error(&self, reason: &str) {
        let mut reasons = self.error_reasons.lock().unwrap_or_else(|p| p.into_inner());
        *reasons.entry(reason.to_owned()).or_default() += 1;
    }

    pub fn delivery(&self, micros: u64) {
        bump(&self.deliveries);
        record(&self.delivery_latency, micros);
    }

    pub fn ack(&self, micros: u64, members: u64) {
        bump(&self.acks_ok);
        self.expected_deliveries
            .fetch_add(members, Ordering::Relaxed);
        record(&self.ack_latency, micros);
    }

    pub fn report(&self) -> anyhow::Result<WorkerReport> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Ok(WorkerReport {
            counts: Counts {
                connected: get(&self.connected),
                connect_errors: get(&self.connect_errors),
                join_errors: get(&self.join_errors),
                retried: get(&self.retried),
                closed: get(&self.closed),
                sends: get(&self.sends),
                send_skipped: get(&self.send_skipped),
                acks_ok: get(&self.acks_ok),
                acks_error: get(&self.acks_error),
                expected_deliveries: get(&self.expected_deliveries),
                deliveries: get(&self.deliveries),
            },
            error_reasons: self
                .error_reasons
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            delivery_latency: hist(&self.delivery_latency)?,
            ack_latency: hist(&self.ack_latency)?,
            calls: Some(self.calls.report()?),
            huddle: Some(self.huddle.report()?),
        })
    }
}

/// Plain counts, added across workers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counts {
    pub connected: u64,
    pub connect_errors: u64,
    pub join_errors: u64,
    /// Tries retried (`--connect-attempts`); absent in older summaries.
    #[serde(default)]
    pub retried: u64,
    pub closed: u64,
    pub sends: u64,
    pub send_skipped: u64,
    pub acks_ok: u64,
    pub acks_error: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.connected += o.connected;
        self.connect_errors += o.connect_errors;
        self.join_errors += o.join_errors;
        self.retried += o.retried;
        self.closed += o.closed;
        self.sends += o.sends;
        self.send_skipped += o.send_skipped;
        self.acks_ok += o.acks_ok;
        self.acks_error += o.acks_error;
        self.expected_deliveries += o.expected_deliveries;
        self.deliveries += o.deliveries;
    }
}

/// A worker's final report, one JSON line on its stdout.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerReport {
    pub counts: Counts,
    pub error_reasons: BTreeMap<String, u64>,
    /// base64 of the V2-serialized histogram, microseconds.
    pub delivery_latency: String,
    pub ack_latency: String,
    #[serde(default)]
    pub calls: Option<CallReport>,
    #[serde(default)]
    pub huddle: Option<HuddleReport>,
}

/// Call counts, added across workers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CallCounts {
    pub started: u64,
    pub setups: u64,
    pub completed: u64,
    pub failed: u64,
    pub relays: u64,
}

impl CallCounts {
    fn add(&mut self, o: &CallCounts) {
        self.started += o.started;
        self.setups += o.setups;
        self.completed += o.completed;
        self.failed += o.failed;
        self.relays += o.relays;
    }
}

/// A worker's [`CallStats`], histograms encoded like the others.
#[derive(Debug, Serialize, Deserialize)]
pub struct CallReport {
    pub counts: CallCounts,
    pub ring: String,
    pub answered: String,
    pub setup: String,
    pub relay: String,
    pub ended: String,
    pub start_lag: String,
}

/// Every worker's call figures added together.
pub struct CallTotals {
    pub counts: CallCounts,
    pub ring: Histogram<u64>,
    pub answered: Histogram<u64>,
    pub setup: Histogram<u64>,
    pub relay: Histogram<u64>,
    pub ended: Histogram<u64>,
    pub start_lag: Histogram<u64>,
}

impl Default for CallTotals {
    fn default() -> Self {
        CallTotals {
            counts: CallCounts::default(),
            ring: histogram(),
            answered: histogram(),
            setup: histogram(),
            relay: histogram(),
            ended: histogram(),
            start_lag: histogram(),
        }
    }
}

impl CallTotals {
    fn add(&mut self, r: &CallReport) -> anyhow::Result<()> {
        self.counts.add(&r.counts);
        self.ring.add(decode(&r.ring)?)?;
        self.answered.add(decode(&r.answered)?)?;
        self.setup.add(decode(&r.setup)?)?;
        self.relay.add(decode(&r.relay)?)?;
        self.ended.add(decode(&r.ended)?)?;
        self.start_lag.add(decode(&r.start_lag)?)?;
        Ok(())
    }
}

/// Huddle counts, added across workers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HuddleCounts {
    pub rooms: u64,
    pub toggles: u64,
    pub relays_sent: u64,
    pub updates: u64,
    pub unmatched: u64,
    pub relays: u64,
    #[serde(default)]
    pub stale: u64,
    pub violations: u64,
}

impl HuddleCounts {
    fn add(&mut self, o: &HuddleCounts) {
        self.rooms += o.rooms;
        self.toggles += o.toggles;
        self.relays_sent += o.relays_sent;
        self.updates += o.updates;
        self.unmatched += o.unmatched;
        self.relays += o.relays;
        self.stale += o.stale;
        self.violations += o.violations;
    }
}

/// A worker's [`HuddleStats`], histograms encoded like the others.
#[derive(Debug, Serialize, Deserialize)]
pub struct HuddleReport {
    pub counts: HuddleCounts,
    pub toggle_reply: String,
    pub relay_reply: String,
    pub broadcast: String,
    pub relay: String,
    pub toggle_lag: String,
}

/// Every worker's huddle figures added together.
pub struct HuddleTotals {
    pub counts: HuddleCounts,
    pub toggle_reply: Histogram<u64>,
    pub relay_reply: Histogram<u64>,
    pub broadcast: Histogram<u64>,
    pub relay: Histogram<u64>,
    pub toggle_lag: Histogram<u64>,
}

impl Default for HuddleTotals {
    fn default() -> Self {
        HuddleTotals {
            counts: HuddleCounts::default(),
            toggle_reply: histogram(),
            relay_reply: histogram(),
            broadcast: histogram(),
            relay: histogram(),
            toggle_lag: histogram(),
        }
    }
}

impl HuddleTotals {
    fn add(&mut self, r: &HuddleReport) -> anyhow::Result<()> {
        self.counts.add(&r.counts);
        self.toggle_reply.add(decode(&r.toggle_reply)?)?;
        self.relay_reply.add(decode(&r.relay_reply)?)?;
        self.broadcast.add(decode(&r.broadcast)?)?;
        self.relay.add(decode(&r.relay)?)?;
        self.toggle_lag.add(decode(&r.toggle_lag)?)?;
        Ok(())
    }
}

/// Every worker's report added together.
pub struct Totals {
    pub counts: Counts,
    pub error_reasons: BTreeMap<String, u64>,
    pub delivery_latency: Histogram<u64>,
    pub ack_latency: Histogram<u64>,
    pub calls: CallTotals,
    pub huddle: HuddleTotals,
}

impl Totals {
    pub fn merge(reports: &[WorkerReport]) -> anyhow::Result<Totals> {
        let mut totals = Totals {
            counts: Counts::default(),
            error_reasons: BTreeMap::new(),
            delivery_latency: histogram(),
            ack_latency: histogram(),
            calls: CallTotals::default(),
            huddle: HuddleTotals::default(),
        };
        for r in reports {
            totals.counts.add(&r.counts);
            for (reason, n) in &r.error_reasons {
                *totals.error_reasons.entry(reason.clone()).or_default() += n;
            }
            totals.delivery_latency.add(decode(&r.delivery_latency)?)?;
            totals.ack_latency.add(decode(&r.ack_latency)?)?;
            if let Some(calls) = &r.calls {
                totals.calls.add(calls)?;
            }
            if let Some(huddle) = &r.huddle {
                totals.huddle.add(huddle)?;
            }
        }
        Ok(totals)
    }
}

fn encode(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow::anyhow!("histogram serialization: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("histogram base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram deserialization: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_merge_counts_and_histograms() {
        let a = Stats::default();
        a.delivery(100);
        a.delivery(200);
        a.ack(50, 3);
        a.error("rate_limited");
        let b = Stats::default();
        b.delivery(300);
        b.error("rate_limited");
        let totals = Totals::merge(&[a.report().unwrap(), b.report().unwrap()]).unwrap();
        assert_eq!(totals.counts.deliveries, 3);
        assert_eq!(totals.counts.expected_deliveries, 3);
        assert_eq!(totals.delivery_latency.len(), 3);
        assert_eq!(totals.ack_latency.len(), 1);
        assert_eq!(totals.error_reasons["rate_limited"], 2);
        assert_eq!(totals.calls.counts.started, 0);
    }

    #[test]
    fn call_figures_merge_and_old_reports_still_parse() {
        let a = Stats::default();
        a.bump(|s| &s.calls.started);
        a.bump(|s| &s.calls.setups);
        a.calls.record(CallLatency::Ring, 1500);
        let b = Stats::default();
        b.bump(|s| &s.calls.started);
        b.calls.record(CallLatency::Ring, 2500);
        b.calls.record(CallLatency::Relay, 700);
        let totals = Totals::merge(&[a.report().unwrap(), b.report().unwrap()]).unwrap();
        assert_eq!(totals.calls.counts.started, 2);
        assert_eq!(totals.calls.counts.setups, 1);
        assert_eq!(totals.calls.ring.len(), 2);
        assert_eq!(totals.calls.relay.len(), 1);
        // A report without `calls` (written before the scenario) merges.
        let mut old = serde_json::to_value(Stats::default().report().unwrap()).unwrap();
        old.as_object_mut().unwrap().remove("calls");
        let old: WorkerReport = serde_json::from_value(old).unwrap();
        assert!(old.calls.is_none());
        assert!(Totals::merge(&[old]).is_ok());
    }

    #[test]
    fn huddle_figures_merge_and_old_reports_still_parse() {
        let a = Stats::default();
        a.bump(|s| &s.huddle.toggles);
        a.bump(|s| &s.huddle.violations);
        a.huddle.record(HuddleLatency::Broadcast, 1200);
        let b = Stats::default();
        b.bump(|s| &s.huddle.toggles);
        b.huddle.record(HuddleLatency::Broadcast, 800);
        b.huddle.record(HuddleLatency::Relay, 400);
        let totals = Totals::merge(&[a.report().unwrap(), b.report().unwrap()]).unwrap();
        assert_eq!(totals.huddle.counts.toggles, 2);
        assert_eq!(totals.huddle.counts.violations, 1);
        assert_eq!(totals.huddle.broadcast.len(), 2);
        assert_eq!(totals.huddle.relay.len(), 1);
        let mut old = serde_json::to_value(Stats::default().report().unwrap()).unwrap();
        old.as_object_mut().unwrap().remove("huddle");
        let old: WorkerReport = serde_json::from_value(old).unwrap();
        assert!(old.huddle.is_none());
        assert!(Totals::merge(&[old]).is_ok());
    }
}
