//! Where jobs wait for a push-svc worker.
//!
//! - Distributed ([`run_jetstream`]): a JetStream stream with work-queue
//!   retention captures `<prefix>.svc.push.>`, so a notice published while
//!   every push-svc is down or busy waits (up to [`QueueSettings::capacity`]
//!   jobs); one durable consumer shared by the replicas hands each job to
//!   one replica, which acks it once handled. A replica killed mid-job
//!   leaves it unacked: it is redelivered after [`ACK_WAIT`], and the
//!   [`crate::sent`] log keeps devices already pushed from a second push.
//! - All-in-one ([`run_memory`]): the in-process bus's notices go into a
//!   bounded channel; a full channel drops the newest (counted), so a
//!   provider outage never slows chat.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use futures::StreamExt as _;
use quckchat_runtime::bus::{Bus, BusError, Headers, Subjects};
use quckchat_runtime::{routes, telemetry};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::jobs::Job;
use crate::service::{JobError, PushService, Tally};

/// Handles `job` in a span continuing the trace its notice came with (the
/// message's send, the call's event), so its pushes join that trace.
async fn handle_traced(
    service: &PushService,
    job: &Job,
    headers: &Headers,
) -> Result<Tally, JobError> {
    use tracing::Instrument as _;
    let span = tracing::info_span!(
        target: telemetry::TRACE,
        "push.job",
        otel.name = %format_args!("push.{}", job.notice()),
        otel.kind = "consumer",
        trace_id = tracing::field::Empty,
    );
    telemetry::follow(&span, headers);
    service.handle(job).instrument(span).await
}

/// How long a delivered job may stay unacked before JetStream gives it to
/// another replica (longer than a push's retries, see
/// [`crate::deliver::RetryPolicy`]).
pub const ACK_WAIT: Duration = Duration::from_secs(90);
/// Deliveries of one job at most.
pub const MAX_DELIVER: i64 = 10;
/// Wait before a job that failed on a neighbour is tried again.
pub const RETRY_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    /// Jobs waiting at most (`PUSH_QUEUE_CAPACITY`).
    pub capacity: usize,
    /// Jobs handled at once per replica.
    pub concurrency: usize,
}

fn notice_of(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
}

/// The JetStream stream name for a subject prefix.
pub fn stream_name(subjects: &Subjects) -> String {
    let prefix: String = subjects
        .prefix()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("QUCKCHAT_PUSH_{prefix}")
}

/// Creates (or updates) the work-queue stream and the shared consumer.
pub async fn jetstream_consumer(
    client: &async_nats::Client,
    subjects: &Subjects,
    settings: QueueSettings,
) -> Result<consumer::PullConsumer, String> {
    let js = jetstream::new(client.clone());
    let name = stream_name(subjects);
    let wildcard = subjects.service_event(routes::PUSH, ">");
    let stream = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![wildcard],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: i64::try_from(settings.capacity).unwrap_or(i64::MAX),
            discard: stream::DiscardPolicy::New,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("JetStream stream {name}: {e}"))?;
    stream
        .get_or_create_consumer(
            "push-svc",
            consumer::pull::Config {
                durable_name: Some("push-svc".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_deliver: MAX_DELIVER,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("JetStream consumer push-svc on {name}: {e}"))
}

/// Handles the stream's jobs until `shutdown`; jobs in hand finish first
/// (at most `drain`).
pub async fn run_jetstream(
    service: Arc<PushService>,
    consumer: consumer::PullConsumer,
    settings: QueueSettings,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let slots = Arc::new(Semaphore::new(settings.concurrency));
    let tasks = TaskTracker::new();
    'outer: loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(%err, "push queue not readable: retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(RETRY_DELAY) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => break 'outer,
                next = messages.next() => next,
            };
            let msg = match next {
                Some(Ok(msg)) => msg,
                Some(Err(err)) => {
                    tracing::warn!(%err, "push queue read failed");
                    continue;
                }
                None => continue 'outer,
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break 'outer;
            };
            let service = service.clone();
            // The trace context the notice was published with.
            let headers: Headers = msg
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .flat_map(|(name, values)| {
                    values
                        .iter()
                        .map(move |v| (name.to_string(), v.as_str().to_owned()))
                })
                .collect();
            tasks.spawn(async move {
                let _slot = slot;
                let ack = match Job::decode(notice_of(&msg.subject), &msg.payload) {
                    Err(err) => {
                        tracing::warn!(%err, "push job dropped");
                        AckKind::Term
                    }
                    Ok(job) => match handle_traced(&service, &job, &headers).await {
                        Ok(tally) => {
                            tracing::debug!(notice = job.notice(), ?tally, "push job done");
                            AckKind::Ack
                        }
                        Err(err) => {
                            tracing::warn!(%err, notice = job.notice(), "push job failed: retrying");
                            AckKind::Nak(Some(RETRY_DELAY))
                        }
                    },
                };
                if let Err(err) = msg.ack_with(ack).await {
                    tracing::warn!(%err, "push job not acknowledged");
                }
            });
        }
    }
    tasks.close();
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        tracing::warn!("push jobs still running after the drain window (they are redelivered)");
    }
}

/// Takes the in-process bus's push notices into a bounded queue and handles
/// them until `shutdown` (at most `drain` more for queued jobs).
pub async fn run_memory(
    service: Arc<PushService>,
    bus: Arc<dyn Bus>,
    subjects: &Subjects,
    settings: QueueSettings,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<tokio::task::JoinHandle<()>, BusError> {
    let mut notices = bus
        .subscribe(&subjects.service_event(routes::PUSH, ">"), None)
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Job, Headers)>(settings.capacity.max(1));
    let intake_stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                () = intake_stop.cancelled() => return,
                msg = notices.next() => match msg { Some(m) => m, None => return },
            };
            match Job::decode(notice_of(&msg.subject), &msg.payload) {
                Ok(job) => {
                    if tx.try_send((job, msg.headers)).is_err() {
                        metrics::counter!("quckchat_push_dropped_total").increment(1);
                        tracing::warn!("push queue full: notification dropped");
                    }
                }
                Err(err) => tracing::warn!(%err, "push job dropped"),
            }
        }
    });
    Ok(tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(settings.concurrency));
        let tasks = TaskTracker::new();
        loop {
            let (job, headers) = tokio::select! {
                () = shutdown.cancelled() => break,
                job = rx.recv() => match job { Some(j) => j, None => break },
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let service = service.clone();
            tasks.spawn(async move {
                let _slot = slot;
                for attempt in 1..=3 {
                    match handle_traced(&service, &job, &headers).await {
                        Ok(_) => return,
                        Err(err) if attempt < 3 => {
                            tracing::warn!(%err, "push job failed: retrying");
                            tokio::time::sleep(RETRY_DELAY).await;
                        }
                        Err(err) => tracing::warn!(%err, "push job given up"),
                    }
                }
            });
        }
        tasks.close();
        if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            tracing::warn!("push jobs still running after the drain window");
        }
    }))
}
