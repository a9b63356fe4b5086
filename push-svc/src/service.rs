//! Who gets which push: each [`Job`] becomes notifications for the devices
//! of the users it concerns who have no live connection, each pushed once
//! ([`Deliverer`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use quckchat_proto::bus::{call_push, CallPush, MessagePush};
use quckchat_proto::push::NotifyRequest;
use quckchat_runtime::grpc::CallError;
use quckchat_runtime::time::now_ms;

use crate::clients::{ChatInfo, Online};
use crate::deliver::{Delivered, Deliverer};
use crate::devices::{Device, Devices, DevicesError, Platform};
use crate::jobs::Job;
use crate::providers::{Kind, Notification};

/// How long a message or missed-call push may wait for the device.
pub const ALERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why a job is to be tried again later (its queue redelivers it).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Neighbour(#[from] CallError),
    #[error("{0}")]
    Devices(#[from] DevicesError),
}

/// What a job did, per outcome (tests, logs).
pub type Tally = BTreeMap<String, usize>;

pub struct PushService {
    devices: Arc<dyn Devices>,
    online: Arc<dyn Online>,
    chat: Arc<dyn ChatInfo>,
    deliverer: Arc<Deliverer>,
    /// Show message content in alerts (`PUSH_PREVIEW`).
    preview: bool,
}

impl PushService {
    pub fn new(
        devices: Arc<dyn Devices>,
        online: Arc<dyn Online>,
        chat: Arc<dyn ChatInfo>,
        deliverer: Arc<Deliverer>,
        preview: bool,
    ) -> Self {
        Self {
            devices,
            online,
            chat,
            deliverer,
            preview,
        }
    }

    pub fn devices(&self) -> &Arc<dyn Devices> {
        &self.devices
    }

    /// Handles one job; an error means "try the whole job again later"
    /// (pushes already made are not made again).
    pub async fn handle(&self, job: &Job) -> Result<Tally, JobError> {
        match job {
            Job::Message(m) => self.message(m).await,
            Job::Call(c) => self.call(c).await,
            Job::Notify(n) => self.notify(n).await,
        }
    }

    /// `users` without a live connection.
    async fn offline(&self, users: Vec<String>) -> Result<Vec<String>, JobError> {
        if users.is_empty() {
            return Ok(users);
        }
        let online = self.online.online(&users).await?;
        Ok(users.into_iter().filter(|u| !online.contains(u)).collect())
    }

    async fn devices_of(
        &self,
        users: &[String],
        platforms: &[Platform],
    ) -> Result<Vec<Device>, JobError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .devices
            .devices_of(users)
            .await?
            .into_iter()
            .filter(|d| platforms.contains(&d.platform))
            .collect())
    }

    async fn message(&self, m: &MessagePush) -> Result<Tally, JobError> {
        let Some(members) = self.chat.members(&m.conversation_id).await? else {
            return Ok(Tally::new());
        };
        let recipients: Vec<String> = members
            .iter()
            .filter(|u| **u != m.sender_id)
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let offline = self.offline(recipients).await?;
        let devices = self
            .devices_of(&offline, &[Platform::Fcm, Platform::Apns])
            .await?;
        // The badge: each recipient's unread count (best effort), asked
        // for all of them at once.
        let users: HashSet<&str> = devices.iter().map(|d| d.user_id.as_str()).collect();
        let badges: HashMap<&str, Option<u32>> =
            join_all(users.into_iter().map(|user| async move {
                let badge = match self.chat.unread_total(user).await {
                    Ok(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
                    Err(err) => {
                        tracing::debug!(%err, "badge unknown");
                        None
                    }
                };
                (user, badge)
            }))
            .await
            .into_iter()
            .collect();
        let base = Notification {
            kind: Kind::Message,
            title: Some("New message".to_owned()),
            body: Some(if self.preview && !m.preview.is_empty() {
                m.preview.clone()
            } else {
                "You have a new message".to_owned()
            }),
            data: [
                ("type", "message"),
                ("conversationId", m.conversation_id.as_str()),
                ("messageId", m.message_id.as_str()),
                ("seq", &m.seq.to_string()),
                ("senderId", m.sender_id.as_str()),
                ("messageType", m.message_type.as_str()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            collapse_id: Some(m.conversation_id.clone()),
            badge: None,
            ttl: ALERT_TTL,
        };
        let job = format!("m:{}", m.message_id);
        Ok(self
            .deliver_all(&job, &devices, |d| {
                let mut n = base.clone();
                n.badge = badges.get(d.user_id.as_str()).copied().flatten();
                n
            })
            .await)
    }

    async fn call(&self, c: &CallPush) -> Result<Tally, JobError> {
        let callee = vec![c.callee_id.clone()];
        let data = |kind: &str| -> BTreeMap<String, String> {
            [
                ("type", kind),
                ("callId", c.call_id.as_str()),
                ("callerId", c.caller_id.as_str()),
                ("callType", c.call_type.as_str()),
                ("conversationId", c.conversation_id.as_str()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
        };
        let incoming_job = format!("ci:{}", c.call_id);
        match c.kind() {
            call_push::Kind::Incoming => {
                let offline = self.offline(callee).await?;
                let devices = self
                    .devices_of(&offline, &[Platform::ApnsVoip, Platform::Fcm])
                    .await?;
                let left = c.ring_expires_at_ms - now_ms();
                if left <= 0 {
                    return Ok(Tally::new());
                }
                let mut data = data("incoming_call");
                data.insert("ringExpiresAtMs".into(), c.ring_expires_at_ms.to_string());
                let n = Notification {
                    kind: Kind::IncomingCall,
                    title: None,
                    body: None,
                    data,
                    collapse_id: Some(c.call_id.clone()),
                    badge: None,
                    ttl: Duration::from_millis(u64::try_from(left).unwrap_or(0)),
                };
                Ok(self
                    .deliver_all(&incoming_job, &devices, |_| n.clone())
                    .await)
            }
            call_push::Kind::Missed => {
                let offline = self.offline(callee).await?;
                let devices = self
                    .devices_of(&offline, &[Platform::Fcm, Platform::Apns])
                    .await?;
                let kind = if c.call_type == "video" {
                    "video"
                } else {
                    "voice"
                };
                let n = Notification {
                    kind: Kind::MissedCall,
                    title: Some("Missed call".to_owned()),
                    body: Some(format!("Missed {kind} call")),
                    data: data("missed_call"),
                    collapse_id: Some(c.call_id.clone()),
                    badge: None,
                    ttl: ALERT_TTL,
                };
                Ok(self
                    .deliver_all(&format!("cm:{}", c.call_id), &devices, |_| n.clone())
                    .await)
            }
            call_push::Kind::Ended => {
                // Withdraw the ringing push where one was sent.
                let mut rung = Vec::new();
                for d in self
                    .devices_of(&callee, &[Platform::ApnsVoip, Platform::Fcm])
                    .await?
                {
                    let key = Deliverer::key(&incoming_job, &d);
                    if matches!(self.deliverer.sent_log().was_sent(&key).await, Ok(true)) {
                        rung.push(d);
                    }
                }
                let mut data = data("call_ended");
                data.insert("reason".into(), c.end_reason.clone());
                let n = Notification {
                    kind: Kind::CallEnded,
                    title: None,
                    body: None,
                    data,
                    collapse_id: Some(c.call_id.clone()),
                    badge: None,
                    ttl: Duration::from_secs(60),
                };
                Ok(self
                    .deliver_all(&format!("ce:{}", c.call_id), &rung, |_| n.clone())
                    .await)
            }
            call_push::Kind::Unspecified => Ok(Tally::new()),
        }
    }

    async fn notify(&self, req: &NotifyRequest) -> Result<Tally, JobError> {
        let users: Vec<String> = req
            .user_ids
            .iter()
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let users = if req.only_offline {
            self.offline(users).await?
        } else {
            users
        };
        let devices = self
            .devices_of(&users, &[Platform::Fcm, Platform::Apns])
            .await?;
        let given = req.notification.clone().unwrap_or_default();
        let n = Notification {
            kind: Kind::Message,
            title: Some(given.title).filter(|t| !t.is_empty()),
            body: Some(given.body).filter(|b| !b.is_empty()),
            data: given.data.into_iter().collect(),
            collapse_id: Some(given.collapse_id).filter(|c| !c.is_empty()),
            badge: None,
            ttl: ALERT_TTL,
        };
        Ok(self
            .deliver_all(&format!("n:{}", req.notification_id), &devices, |_| {
                n.clone()
            })
            .await)
    }

    /// Pushes to every device at once (each provider bounds its own
    /// concurrency); counts the outcomes.
    async fn deliver_all(
        &self,
        job: &str,
        devices: &[Device],
        notification_for: impl Fn(&Device) -> Notification,
    ) -> Tally {
        let pushes = devices.iter().map(|d| {
            let n = notification_for(d);
            async move { self.deliverer.deliver(job, d, &n).await }
        });
        let mut tally = Tally::new();
        for outcome in join_all(pushes).await {
            let label = match outcome {
                Delivered::Sent => "sent",
                Delivered::AlreadySent => "already_sent",
                Delivered::DeadToken => "dead_token",
                Delivered::NoProvider => "no_provider",
                Delivered::GaveUp(_) => "gave_up",
            };
            *tally.entry(label.to_owned()).or_default() += 1;
        }
        tally
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
