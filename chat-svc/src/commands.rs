//! Takes client commands off the bus through the service kit
//! (`<prefix>.cmd.chat`, queue group `chat`: every replica shares the load
//! and a dead replica's share goes to the others), and follows membership
//! changes: other replicas' notices and the store's own change stream.

use std::sync::Arc;
use std::time::Duration;

use quckchat_runtime::bus::{Bus, BusError, Subjects};
use quckchat_runtime::service;
use tokio_util::sync::CancellationToken;

use crate::service::ChatService;

/// Subscribes, then handles commands until `shutdown`; resolves after the
/// commands in flight have been answered (at most `drain`).
pub async fn serve(
    chat: Arc<ChatService>,
    bus: Arc<dyn Bus>,
    subjects: &Subjects,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<tokio::task::JoinHandle<()>, BusError> {
    // Every replica hears membership changes (no queue group).
    let mut changes = bus.subscribe(&chat.membership_subject(), None).await?;
    let consumer = service::serve(chat.clone(), bus, subjects, shutdown.clone(), drain).await?;
    // Membership changes the backend writes straight into the store.
    let watcher = tokio::spawn(chat.clone().watch_memberships(shutdown.clone()));
    let listener = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                msg = changes.next() => match msg {
                    Some(msg) => {
                        if let Ok(id) = std::str::from_utf8(&msg.payload) {
                            chat.invalidate(id).await;
                        }
                    }
                    None => return,
                },
            }
        }
    });
    Ok(tokio::spawn(async move {
        let _ = consumer.await;
        let _ = listener.await;
        let _ = watcher.await;
    }))
}
