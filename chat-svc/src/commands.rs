//! Takes client commands off the bus through the service kit
//! (`<prefix>.cmd.chat`, queue group `chat`: every replica shares the load
//! and a dead replica's share goes to the others), and follows membership
//! changes: other replicas' notices and the store's own change stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use quckchat_proto::bus::{MissedEvents, MissedRequest, SequencedEvent};
use quckchat_runtime::bus::{respond, Bus, BusError, BusMessage, Subjects};
use quckchat_runtime::routes;
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
    // Gateways that missed a message:new ask one replica for it.
    let mut missed = bus
        .subscribe(
            &subjects.service_event(routes::CHAT, MISSED),
            Some(routes::CHAT),
        )
        .await?;
    let missed_task = {
        let (chat, bus, shutdown) = (chat.clone(), bus.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    msg = missed.next() => match msg {
                        Some(msg) => {
                            let (chat, bus) = (chat.clone(), bus.clone());
                            tokio::spawn(async move { answer_missed(&chat, bus.as_ref(), &msg).await });
                        }
                        None => return,
                    },
                }
            }
        })
    };
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
        let _ = missed_task.await;
    }))
}

/// The service event gateways ask on for missed `message:new`s.
pub const MISSED: &str = "missed";

/// Answers one gateway's [`MissedRequest`] (an empty answer when the topic
/// is not a conversation or the store fails: the gateway delivers what it
/// has and clients still recover with `lastSeq`).
async fn answer_missed(chat: &ChatService, bus: &dyn Bus, msg: &BusMessage) {
    let events = match MissedRequest::decode(msg.payload.as_ref()) {
        Ok(req) => match req.topic.strip_prefix("chat:") {
            Some(id) => match chat.missed(id, req.after_seq, req.before_seq).await {
                Ok(found) => found,
                Err(err) => {
                    tracing::warn!(?err, topic = %req.topic, "missed messages not read");
                    Vec::new()
                }
            },
            None => Vec::new(),
        },
        Err(err) => {
            tracing::warn!(%err, "undecodable missed-events request");
            Vec::new()
        }
    };
    let reply = MissedEvents {
        events: events
            .into_iter()
            .map(|(seq, payload)| SequencedEvent {
                seq,
                event: "message:new".into(),
                payload: payload.to_string().into_bytes(),
            })
            .collect(),
    };
    if let Err(err) = respond(bus, msg, Bytes::from(reply.encode_to_vec())).await {
        tracing::warn!(%err, "missed events not sent");
    }
}
