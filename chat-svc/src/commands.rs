//! Takes client commands off the bus: `<prefix>.cmd.chat`, queue group
//! `chat`, so every replica shares the load and a dead replica's share goes
//! to the others.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use quckchat_proto::bus::ClientCommand;
use quckchat_runtime::bus::{respond, Bus, BusError, Subjects};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::service::ChatService;

use crate::service::SERVICE;
/// Commands handled at once per replica; more wait on the bus.
const MAX_IN_FLIGHT: usize = 1024;

/// Subscribes, then handles commands until `shutdown`; resolves after the
/// commands in flight have been answered (at most `drain`).
pub async fn serve(
    service: Arc<ChatService>,
    bus: Arc<dyn Bus>,
    subjects: &Subjects,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<tokio::task::JoinHandle<()>, BusError> {
    let mut sub = bus
        .subscribe(&subjects.command(SERVICE), Some(SERVICE))
        .await?;
    // Membership changes the backend writes straight into the store.
    let watcher = tokio::spawn(service.clone().watch_memberships(shutdown.clone()));
    // Every replica hears membership changes (no queue group).
    let mut changes = bus.subscribe(&service.membership_subject(), None).await?;
    let listener = {
        let service = service.clone();
        tokio::spawn(async move {
            while let Some(msg) = changes.next().await {
                if let Ok(id) = std::str::from_utf8(&msg.payload) {
                    service.invalidate(id).await;
                }
            }
        })
    };
    Ok(tokio::spawn(async move {
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let tasks = TaskTracker::new();
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => break,
                msg = sub.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let (service, bus) = (service.clone(), bus.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let cmd = match ClientCommand::decode(msg.payload.as_ref()) {
                    Ok(cmd) => cmd,
                    Err(err) => {
                        tracing::warn!(%err, "undecodable command dropped");
                        return;
                    }
                };
                let reply = service.handle(&cmd).await;
                if let Err(err) =
                    respond(bus.as_ref(), &msg, Bytes::from(reply.encode_to_vec())).await
                {
                    tracing::warn!(%err, event = %cmd.event, "reply not sent");
                }
            });
        }
        drop(sub);
        listener.abort();
        watcher.abort();
        tasks.close();
        if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            tracing::warn!("chat commands still running after the drain window");
        }
    }))
}
