//! Push providers: FCM HTTP v1 ([`fcm`]) and APNS over HTTP/2 ([`apns`]).
//! Each turns a [`Notification`] for one [`Device`] into one provider
//! request and says what happened ([`Outcome`]); retrying, removing dead
//! tokens and counting are the caller's ([`crate::deliver`]).

pub mod apns;
pub mod fcm;

#[cfg(any(test, feature = "testsuite"))]
pub mod fakes;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::devices::Device;

/// What a push is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new chat message (an alert, collapsed per conversation).
    Message,
    /// A call ringing: a VoIP push on iOS (`apns-voip` tokens), a
    /// high-priority data message on Android.
    IncomingCall,
    /// A call that was not picked up (an alert).
    MissedCall,
    /// A ringing call was answered elsewhere or ended: withdraw the ringing
    /// notification (a data message / VoIP push, no alert).
    CallEnded,
}

/// One notification, the same for every device it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub kind: Kind,
    /// Alert title and body (`None` for data-only pushes).
    pub title: Option<String>,
    pub body: Option<String>,
    /// Deep-link data: `conversationId`, `messageId`, `seq`, `callId`, …
    /// (FCM data values are strings; APNS gets them beside `aps`).
    pub data: BTreeMap<String, String>,
    /// Collapses notifications of one thread (`apns-collapse-id`, FCM
    /// `collapse_key`/`tag`), e.g. the conversation id.
    pub collapse_id: Option<String>,
    /// The app icon badge (the user's unread count).
    pub badge: Option<u32>,
    /// Give up delivering after this long (FCM `ttl`, `apns-expiration`).
    pub ttl: Duration,
}

/// What a provider did with one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the provider.
    Sent,
    /// Try again later: 429, 5xx, FCM `UNAVAILABLE`/`INTERNAL`, a transport
    /// error. `after`: the provider's `Retry-After`.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The token is dead (FCM `UNREGISTERED` / `INVALID_ARGUMENT` for the
    /// token; APNS 410, `BadDeviceToken`, `DeviceTokenNotForTopic`): remove
    /// the device, never retry.
    DeadToken { reason: String },
    /// Refused for another reason (bad credentials, a malformed request):
    /// not retried, the device kept.
    Failed { reason: String },
}

impl Outcome {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Retry { .. } => "retry",
            Self::DeadToken { .. } => "dead_token",
            Self::Failed { .. } => "failed",
        }
    }
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `fcm` or `apns` (metric label).
    fn name(&self) -> &'static str;

    /// Sends `notification` to `device` (one provider request).
    async fn send(&self, device: &Device, notification: &Notification) -> Outcome;
}

/// Parses an HTTP `Retry-After` header value: seconds (`120`) or an
/// HTTP date; `None` when it is neither.
pub fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(Duration::from_millis(u64::try_from(wait).unwrap_or(0)))
}

/// A data map from pairs (tests and callers).
pub fn data<const N: usize>(pairs: [(&str, &str); N]) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
