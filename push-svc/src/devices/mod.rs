//! The device registry: which push tokens each user has. One trait, two
//! implementations:
//!
//! - [`MongoDevices`] (distributed mode): the `devices` collection;
//! - [`EmbeddedDevices`] (all-in-one): SQLite `DATA_DIR/devices.sqlite3`.
//!
//! Both pass the [`conformance`] suite. The guarantees callers rely on:
//! - a token belongs to one device record: registering a token again
//!   updates it (idempotent), and registering it for another user moves it
//!   (a phone that changed hands, or an app that logged another user in);
//! - [`Devices::devices_of`] returns every device of the users asked, in one
//!   round trip, ordered by user then token.

mod embedded;
mod mongo;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

use async_trait::async_trait;

pub use embedded::EmbeddedDevices;
pub use mongo::MongoDevices;

/// Where a token is pushed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Platform {
    /// Firebase Cloud Messaging (Android, and iOS through Firebase).
    Fcm,
    /// APNS alerts.
    Apns,
    /// APNS VoIP pushes (PushKit): incoming calls on iOS.
    ApnsVoip,
}

impl Platform {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fcm" => Some(Self::Fcm),
            "apns" => Some(Self::Apns),
            "apns-voip" => Some(Self::ApnsVoip),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fcm => "fcm",
            Self::Apns => "apns",
            Self::ApnsVoip => "apns-voip",
        }
    }
}

/// Longest token accepted (APNS tokens are 64 hex digits, FCM ones ~160
/// characters).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// One registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub user_id: String,
    pub platform: Platform,
    pub token: String,
    /// Which configured app's credentials push to it; `None`: the default.
    pub app: Option<String>,
    /// BCP 47 language tag, for the app's own localisation.
    pub locale: Option<String>,
    /// Unix milliseconds of the last registration.
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevicesError {
    /// The store cannot be reached or refused the write; the text is for
    /// logs, never for clients.
    #[error("device registry unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Devices: Send + Sync + 'static {
    /// Registers (or updates, or moves to `device.user_id`) a token.
    async fn register(&self, device: &Device) -> Result<(), DevicesError>;

    /// Removes a token; whether it was registered.
    async fn unregister(&self, token: &str) -> Result<bool, DevicesError>;

    /// Every device of these users.
    async fn devices_of(&self, user_ids: &[String]) -> Result<Vec<Device>, DevicesError>;

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), DevicesError>;
}
