//! What a huddle is: the persisted room ([`Huddle`]) and its live
//! participants ([`Participant`], one per device, kept in a [`Room`]).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use quckchat_signaling::call::iso_ms;

/// A persisted huddle: it belongs to a conversation and outlives its
/// participants until it is ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Huddle {
    pub id: String,
    pub conversation_id: String,
    /// At most [`MAX_TITLE_BYTES`]; `None` when the creator gave none.
    pub title: Option<String>,
    pub created_by: String,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    /// Unix milliseconds; `None` while it is open.
    pub ended_at_ms: Option<i64>,
}

/// Longest title (bytes of UTF-8).
pub const MAX_TITLE_BYTES: usize = 200;

impl Huddle {
    /// A new open huddle with a fresh id (32 hex digits).
    pub fn new(
        conversation_id: &str,
        title: Option<String>,
        created_by: &str,
        now_ms: i64,
    ) -> Self {
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            conversation_id: conversation_id.to_owned(),
            title,
            created_by: created_by.to_owned(),
            created_at_ms: now_ms,
            ended_at_ms: None,
        }
    }

    pub fn topic(&self) -> String {
        format!("huddle:{}", self.id)
    }

    /// As clients see it.
    pub fn view(&self) -> Value {
        json!({
            "id": self.id,
            "conversationId": self.conversation_id,
            "title": self.title,
            "createdBy": self.created_by,
            "createdAt": iso_ms(self.created_at_ms),
        })
    }
}

/// One device in a huddle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    pub user_id: String,
    pub device_id: String,
    /// The socket it joined from: relays go to it only.
    pub conn_id: String,
    /// The gateway holding that socket (audited for liveness).
    pub node_id: String,
    pub audio: bool,
    pub video: bool,
    pub screen: bool,
    pub hand_raised: bool,
    /// Unix milliseconds.
    pub joined_at_ms: i64,
    /// Set while its socket is gone: it leaves at this time (Unix ms)
    /// unless the device joins again first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub away_until_ms: Option<i64>,
}

impl Participant {
    /// As clients see it.
    pub fn view(&self) -> Value {
        json!({
            "userId": self.user_id,
            "deviceId": self.device_id,
            "audio": self.audio,
            "video": self.video,
            "screen": self.screen,
            "handRaised": self.hand_raised,
            "joinedAt": iso_ms(self.joined_at_ms),
        })
    }

    pub fn is(&self, user_id: &str, device_id: &str) -> bool {
        self.user_id == user_id && self.device_id == device_id
    }
}

/// The live state of one huddle, read and written whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// Bumped by every write (optimistic concurrency between replicas).
    pub rev: u64,
    /// Bumped by every change clients are told of: the `version` of each
    /// `huddle:participant:*` event, strictly increasing without gaps.
    pub version: u64,
    /// In join order.
    pub participants: Vec<Participant>,
}

impl Room {
    /// The participants as clients see them (away ones included: they are
    /// still in the huddle until their grace ends).
    pub fn views(&self) -> Vec<Value> {
        self.participants.iter().map(Participant::view).collect()
    }

    pub fn find(&self, user_id: &str, device_id: &str) -> Option<&Participant> {
        self.participants.iter().find(|p| p.is(user_id, device_id))
    }

    /// Earliest time an away participant leaves.
    pub fn next_departure(&self) -> Option<i64> {
        self.participants
            .iter()
            .filter_map(|p| p.away_until_ms)
            .min()
    }
}
