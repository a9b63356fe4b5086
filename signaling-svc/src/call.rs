//! A call as the service knows it: who, which devices, which stage, how it
//! ended. Shared by the live state ([`crate::state`]), the call log
//! ([`crate::log`]) and what clients see.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use quckchat_runtime::time::iso;

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallType {
    Audio,
    Video,
}

impl CallType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "audio" => Some(Self::Audio),
            "video" => Some(Self::Video),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Video => "video",
        }
    }
}

/// Where a call is: ringing → connected → ended (or ringing → ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallStage {
    Ringing,
    Connected,
    Ended,
}

impl CallStage {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ringing" => Some(Self::Ringing),
            "connected" => Some(Self::Connected),
            "ended" => Some(Self::Ended),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ringing => "ringing",
            Self::Connected => "connected",
            Self::Ended => "ended",
        }
    }
}

/// Why a call ended (`call:ended {reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// A party ended a connected call.
    Hangup,
    /// The callee declined.
    Rejected,
    /// Nobody answered within `CALL_RING_TIMEOUT_SECS`.
    NoAnswer,
    /// The caller gave up while it rang.
    Cancelled,
    /// A party's device was gone longer than `CALL_DISCONNECT_GRACE_SECS`.
    Disconnected,
    /// Ended by the backend or an operator (`EndCall`), or the service
    /// could not go on.
    Failed,
    /// A party turned the call into a huddle (`call:escalate`).
    Escalated,
}

impl EndReason {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hangup" => Some(Self::Hangup),
            "rejected" => Some(Self::Rejected),
            "no_answer" => Some(Self::NoAnswer),
            "cancelled" => Some(Self::Cancelled),
            "disconnected" => Some(Self::Disconnected),
            "failed" => Some(Self::Failed),
            "escalated" => Some(Self::Escalated),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hangup => "hangup",
            Self::Rejected => "rejected",
            Self::NoAnswer => "no_answer",
            Self::Cancelled => "cancelled",
            Self::Disconnected => "disconnected",
            Self::Failed => "failed",
            Self::Escalated => "escalated",
        }
    }

    /// The callee never picked up: a missed call for them.
    pub fn is_missed(self) -> bool {
        matches!(self, Self::NoAnswer | Self::Cancelled)
    }
}

/// One call. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub id: String,
    pub caller_id: String,
    pub caller_device: String,
    /// The caller's socket: relays and `call:answered` go to it.
    pub caller_conn: String,
    pub callee_id: String,
    /// The device that answered (empty while ringing).
    pub callee_device: String,
    pub callee_conn: String,
    pub call_type: CallType,
    pub conversation_id: Option<String>,
    pub stage: CallStage,
    pub created_at_ms: i64,
    pub answered_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    pub end_reason: Option<EndReason>,
    /// The user whose action ended it (none for timeouts).
    pub ended_by: Option<String>,
}

/// Which side of a call a user is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Caller,
    Callee,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Callee => "callee",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "caller" => Some(Self::Caller),
            "callee" => Some(Self::Callee),
            _ => None,
        }
    }
}

impl Call {
    /// A new ringing call.
    #[allow(clippy::too_many_arguments)]
    pub fn ringing(
        id: String,
        caller_id: &str,
        caller_device: &str,
        caller_conn: &str,
        callee_id: &str,
        call_type: CallType,
        conversation_id: Option<String>,
        now_ms: i64,
    ) -> Self {
        Self {
            id,
            caller_id: caller_id.to_owned(),
            caller_device: caller_device.to_owned(),
            caller_conn: caller_conn.to_owned(),
            callee_id: callee_id.to_owned(),
            callee_device: String::new(),
            callee_conn: String::new(),
            call_type,
            conversation_id,
            stage: CallStage::Ringing,
            created_at_ms: now_ms,
            answered_at_ms: None,
            ended_at_ms: None,
            end_reason: None,
            ended_by: None,
        }
    }

    pub fn side_of(&self, user_id: &str) -> Option<Side> {
        if user_id == self.caller_id {
            Some(Side::Caller)
        } else if user_id == self.callee_id {
            Some(Side::Callee)
        } else {
            None
        }
    }

    /// The other party's user id.
    pub fn peer_of(&self, side: Side) -> &str {
        match side {
            Side::Caller => &self.callee_id,
            Side::Callee => &self.caller_id,
        }
    }

    /// The socket a side is bound to (empty for a callee that has not
    /// answered).
    pub fn conn_of(&self, side: Side) -> &str {
        match side {
            Side::Caller => &self.caller_conn,
            Side::Callee => &self.callee_conn,
        }
    }

    pub fn is_live(&self) -> bool {
        self.stage != CallStage::Ended
    }

    /// Talk time: from the answer to the end (none if never answered).
    pub fn duration_ms(&self) -> Option<u64> {
        let answered = self.answered_at_ms?;
        let ended = self.ended_at_ms?;
        u64::try_from(ended.saturating_sub(answered)).ok()
    }

    /// `call:ended`'s payload.
    pub fn ended_event(&self) -> Value {
        let mut ev = json!({
            "callId": self.id,
            "reason": self.end_reason.map(EndReason::as_str),
        });
        if let Some(by) = &self.ended_by {
            ev["endedBy"] = json!(by);
        }
        if let Some(d) = self.duration_ms() {
            ev["durationMs"] = json!(d);
        }
        ev
    }

    /// `call:incoming`'s payload.
    pub fn incoming_event(&self) -> Value {
        json!({
            "callId": self.id,
            "callerId": self.caller_id,
            "callType": self.call_type.as_str(),
            "conversationId": self.conversation_id,
            "createdAt": iso_ms(self.created_at_ms),
        })
    }

    /// What a client is shown of a call (`activeCall`, gRPC as JSON).
    pub fn view(&self) -> Value {
        json!({
            "callId": self.id,
            "callerId": self.caller_id,
            "calleeId": self.callee_id,
            "callType": self.call_type.as_str(),
            "conversationId": self.conversation_id,
            "state": self.stage.as_str(),
            "createdAt": iso_ms(self.created_at_ms),
            "answeredAt": self.answered_at_ms.map(iso_ms),
        })
    }
}

/// ISO-8601 UTC with milliseconds.
pub fn iso_ms(ms: i64) -> String {
    iso(chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default())
}

/// Call ids: 24 hex digits, like the backend's MongoDB ObjectIds.
pub fn new_call_id() -> String {
    mongodb::bson::oid::ObjectId::new().to_hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in [
            EndReason::Hangup,
            EndReason::Rejected,
            EndReason::NoAnswer,
            EndReason::Cancelled,
            EndReason::Disconnected,
            EndReason::Failed,
        ] {
            assert_eq!(EndReason::parse(r.as_str()), Some(r));
            assert_eq!(serde_json::to_value(r).unwrap(), json!(r.as_str()));
        }
        for s in [CallStage::Ringing, CallStage::Connected, CallStage::Ended] {
            assert_eq!(CallStage::parse(s.as_str()), Some(s));
        }
        assert_eq!(CallType::parse("video"), Some(CallType::Video));
        assert_eq!(CallType::parse("hologram"), None);
        assert!(EndReason::NoAnswer.is_missed() && EndReason::Cancelled.is_missed());
        assert!(!EndReason::Hangup.is_missed() && !EndReason::Rejected.is_missed());
    }

    #[test]
    fn ended_event_carries_duration_only_when_answered() {
        let mut call = Call::ringing(
            "c1".into(),
            "a",
            "da",
            "ka",
            "b",
            CallType::Audio,
            None,
            1_000,
        );
        call.stage = CallStage::Ended;
        call.ended_at_ms = Some(5_000);
        call.end_reason = Some(EndReason::NoAnswer);
        assert_eq!(
            call.ended_event(),
            json!({"callId": "c1", "reason": "no_answer"})
        );
        call.answered_at_ms = Some(2_000);
        call.end_reason = Some(EndReason::Hangup);
        call.ended_by = Some("b".into());
        assert_eq!(
            call.ended_event(),
            json!({"callId": "c1", "reason": "hangup", "endedBy": "b", "durationMs": 3000})
        );
        assert_eq!(call.side_of("b"), Some(Side::Callee));
        assert_eq!(call.side_of("z"), None);
        assert_eq!(call.peer_of(Side::Callee), "a");
    }
}
