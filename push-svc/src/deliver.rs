//! One notification to one device, once: the claim in the [`SentLog`],
//! bounded concurrency per provider, retries with exponential backoff and
//! jitter (never before the provider's `Retry-After`), and dead tokens
//! removed from the registry at the first refusal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tokio::sync::Semaphore;

use crate::apps::Apps;
use crate::devices::{Device, Devices};
use crate::providers::{Notification, Outcome};
use crate::sent::{SentLog, CLAIM};
use tracing::Instrument as _;

/// How retries go.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Provider requests per push at most.
    pub max_attempts: u32,
    /// First backoff; doubles each attempt, plus up to as much jitter.
    pub base: Duration,
    /// Longest wait between two attempts; a `Retry-After` beyond it gives
    /// the push up (its claim would expire meanwhile).
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base: Duration::from_millis(500),
            max_wait: CLAIM / 3,
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` (1-based `attempt`).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.base * 2u32.saturating_pow(attempt.saturating_sub(1)).min(1 << 16);
        let jitter = rand::rng().random_range(0..=self.base.as_millis() as u64);
        (exp + Duration::from_millis(jitter)).min(self.max_wait)
    }
}

/// What became of one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    Sent,
    /// Pushed (or being pushed) by an earlier handling of the same job.
    AlreadySent,
    /// The token was dead: the device is removed.
    DeadToken,
    /// No credentials for the device's platform and app.
    NoProvider,
    /// Refused, or still failing after every attempt.
    GaveUp(String),
}

pub struct Deliverer {
    apps: Arc<Apps>,
    devices: Arc<dyn Devices>,
    sent: Arc<dyn SentLog>,
    policy: RetryPolicy,
    /// Requests in flight per provider at most.
    limits: std::sync::Mutex<HashMap<&'static str, Arc<Semaphore>>>,
    concurrency: usize,
}

impl Deliverer {
    pub fn new(
        apps: Arc<Apps>,
        devices: Arc<dyn Devices>,
        sent: Arc<dyn SentLog>,
        policy: RetryPolicy,
        concurrency: usize,
    ) -> Self {
        Self {
            apps,
            devices,
            sent,
            policy,
            limits: std::sync::Mutex::new(HashMap::new()),
            concurrency,
        }
    }

    pub fn sent_log(&self) -> &Arc<dyn SentLog> {
        &self.sent
    }

    fn limit(&self, provider: &'static str) -> Arc<Semaphore> {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(provider)
            .or_insert_with(|| Arc::new(Semaphore::new(self.concurrency)))
            .clone()
    }

    /// The key of one job's push to one device.
    pub fn key(job: &str, device: &Device) -> String {
        format!("{job}:{}:{}", device.platform.as_str(), device.token)
    }

    /// Pushes `notification` for job `job` (e.g. `m:<messageId>`) to
    /// `device`, unless that was done already.
    pub async fn deliver(
        &self,
        job: &str,
        device: &Device,
        notification: &Notification,
    ) -> Delivered {
        let Some(provider) = self.apps.provider(device) else {
            metrics::counter!("quckchat_push_total", "provider" => "none", "outcome" => "no_provider")
                .increment(1);
            return Delivered::NoProvider;
        };
        let key = Self::key(job, device);
        match self.sent.claim(&key).await {
            Ok(true) => {}
            Ok(false) => return Delivered::AlreadySent,
            Err(err) => {
                // Without the log a push could go twice: not now.
                tracing::warn!(%err, "push not claimed");
                return Delivered::GaveUp(format!("sent log unavailable: {err}"));
            }
        }
        let limit = self.limit(provider.name());
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let outcome = {
                let Ok(_permit) = limit.acquire().await else {
                    break Delivered::GaveUp("shutting down".into());
                };
                let span = tracing::info_span!(
                    target: quckchat_runtime::telemetry::TRACE,
                    "push",
                    otel.name = %format_args!("push.{}", provider.name()),
                    otel.kind = "client",
                    platform = device.platform.as_str(),
                    attempt,
                    outcome = tracing::field::Empty,
                );
                let outcome = provider
                    .send(device, notification)
                    .instrument(span.clone())
                    .await;
                span.record("outcome", outcome.label());
                outcome
            };
            metrics::counter!(
                "quckchat_push_total",
                "provider" => provider.name(),
                "outcome" => outcome.label()
            )
            .increment(1);
            match outcome {
                Outcome::Sent => break Delivered::Sent,
                Outcome::DeadToken { reason } => {
                    tracing::info!(platform = device.platform.as_str(), %reason, "dead push token removed");
                    if let Err(err) = self.devices.unregister(&device.token).await {
                        tracing::warn!(%err, "dead push token not removed");
                    }
                    break Delivered::DeadToken;
                }
                Outcome::Failed { reason } => break Delivered::GaveUp(reason),
                Outcome::Retry { after, reason } => {
                    if attempt >= self.policy.max_attempts {
                        break Delivered::GaveUp(format!("{reason} (after {attempt} attempts)"));
                    }
                    let backoff = self.policy.backoff(attempt);
                    let wait = match after {
                        Some(after) if after > self.policy.max_wait => {
                            break Delivered::GaveUp(format!(
                                "{reason}: Retry-After {}s is too far",
                                after.as_secs()
                            ));
                        }
                        Some(after) => after.max(backoff.min(after * 2)),
                        None => backoff,
                    };
                    tokio::time::sleep(wait).await;
                }
            }
        };
        let marked = if result == Delivered::Sent {
            self.sent.sent(&key).await
        } else {
            self.sent.release(&key).await
        };
        if let Err(err) = marked {
            tracing::warn!(%err, "push outcome not recorded");
        }
        if let Delivered::GaveUp(reason) = &result {
            tracing::warn!(provider = provider.name(), %reason, "push given up");
        }
        result
    }
}
