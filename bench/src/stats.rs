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
        let hist = |slot: &Mutex<Option<Histogram<u64>>>| {
            let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            encode(guard.as_ref().unwrap_or(&histogram()))
        };
        Ok(WorkerReport {
            counts: Counts {
                connected: get(&self.connected),
                connect_errors: get(&self.connect_errors),
                join_errors: get(&self.join_errors),
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
        })
    }
}

/// Plain counts, added across workers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counts {
    pub connected: u64,
    pub connect_errors: u64,
    pub join_errors: u64,
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
}

/// Every worker's report added together.
pub struct Totals {
    pub counts: Counts,
    pub error_reasons: BTreeMap<String, u64>,
    pub delivery_latency: Histogram<u64>,
    pub ack_latency: Histogram<u64>,
}

impl Totals {
    pub fn merge(reports: &[WorkerReport]) -> anyhow::Result<Totals> {
        let mut totals = Totals {
            counts: Counts::default(),
            error_reasons: BTreeMap::new(),
            delivery_latency: histogram(),
            ack_latency: histogram(),
        };
        for r in reports {
            totals.counts.add(&r.counts);
            for (reason, n) in &r.error_reasons {
                *totals.error_reasons.entry(reason.clone()).or_default() += n;
            }
            totals.delivery_latency.add(decode(&r.delivery_latency)?)?;
            totals.ack_latency.add(decode(&r.ack_latency)?)?;
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
    }
}
