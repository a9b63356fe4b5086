//! Every reason a client can be refused, defined once (docs/protocol.md
//! lists them for client authors).
//!
//! A service's own error enum (`thiserror`) maps into [`ClientError`]; the
//! gateway's refusals are [`ClientError`]s too. Each reason has one wire
//! text, one gRPC code and says whether trying again can help. What a client
//! sees never carries internals: an error with a cause (a store or Redis
//! failure) is logged where it happens and reaches the client as
//! `service unavailable`.

use serde_json::{json, Value};

/// Why a push, a join or a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Not allowed in: no or bad token, or not a member.
    #[error("unauthorized")]
    Unauthorized,
    /// Allowed in, but not to do this (e.g. edit another's message).
    #[error("forbidden")]
    Forbidden,
    /// The thing named does not exist (or is not visible to the caller).
    #[error("not_found")]
    NotFound,
    /// The other side is taken (a call to someone already in one).
    #[error("busy")]
    Busy,
    /// Too many pushes; try again later.
    #[error("rate_limited")]
    RateLimited,
    /// The service did not answer in time; the push may still take effect.
    #[error("timeout")]
    Timeout,
    /// No service or dependency could take it right now.
    #[error("service unavailable")]
    Unavailable,
    /// The payload is wrong; the text names the field and what it must be.
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
    /// The payload is over the size limit (bytes).
    #[error("payload too large")]
    PayloadTooLarge { limit: usize },
    /// An event the channel does not know.
    #[error("unknown event")]
    UnknownEvent(String),
    /// No channel kind matches the topic (Phoenix's wording).
    #[error("unmatched topic")]
    UnmatchedTopic,
    /// The kind exists but the id is malformed.
    #[error("invalid topic")]
    InvalidTopic,
    /// A socket joined as many channels as it may.
    #[error("too many channels")]
    TooManyChannels,
    /// A frame that could be answered but not understood.
    #[error("invalid frame: {0}")]
    InvalidFrame(String),
    /// A binary frame where only text is spoken.
    #[error("binary payloads are not supported")]
    BinaryPayload,
    /// The message was deleted; it can no longer change.
    #[error("message deleted")]
    MessageDeleted,
    /// Another device of the callee answered the call first.
    #[error("answered_elsewhere")]
    AnsweredElsewhere,
    /// The call ended before this reached it.
    #[error("call_ended")]
    CallEnded,
    /// The huddle has as many participants as it may.
    #[error("huddle_full")]
    HuddleFull,
    /// Another participant is sharing their screen.
    #[error("screen_in_use")]
    ScreenInUse,
    /// The channel was left or replaced before the reply came.
    #[error("closed")]
    Closed,
    /// A reply that could not be understood (a bug, logged where seen).
    #[error("internal error")]
    Internal,
}

impl ClientError {
    /// `invalid payload: <field> must be <what>`, the one style of payload
    /// errors.
    pub fn invalid(field: &str, must_be: &str) -> Self {
        Self::InvalidPayload(format!("{field} must be {must_be}"))
    }

    /// The reason text clients match on.
    pub fn reason(&self) -> String {
        self.to_string()
    }

    /// The reply payload: `{reason}` and, for some reasons, a detail field.
    pub fn response(&self) -> Value {
        match self {
            Self::UnknownEvent(event) => json!({ "reason": self.reason(), "event": event }),
            Self::PayloadTooLarge { limit } => json!({ "reason": self.reason(), "limit": limit }),
            other => json!({ "reason": other.reason() }),
        }
    }

    /// A metric label for this reason (static: reasons are few and fixed).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Busy => "busy",
            Self::RateLimited => "rate_limited",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::InvalidPayload(_) => "invalid_payload",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnknownEvent(_) => "unknown_event",
            Self::UnmatchedTopic => "unmatched_topic",
            Self::InvalidTopic => "invalid_topic",
            Self::TooManyChannels => "too_many_channels",
            Self::InvalidFrame(_) => "invalid_frame",
            Self::BinaryPayload => "binary_payload",
            Self::MessageDeleted => "message_deleted",
            Self::AnsweredElsewhere => "answered_elsewhere",
            Self::CallEnded => "call_ended",
            Self::HuddleFull => "huddle_full",
            Self::ScreenInUse => "screen_in_use",
            Self::Closed => "closed",
            Self::Internal => "internal",
        }
    }

    /// Whether the same request later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::Busy | Self::RateLimited | Self::Timeout | Self::Unavailable
        )
    }

    /// The gRPC status code of this reason.
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Unauthorized => Code::PermissionDenied,
            Self::Forbidden => Code::PermissionDenied,
            Self::NotFound => Code::NotFound,
            Self::Busy => Code::FailedPrecondition,
            Self::RateLimited => Code::ResourceExhausted,
            Self::Timeout => Code::DeadlineExceeded,
            Self::Unavailable => Code::Unavailable,
            Self::InvalidPayload(_)
            | Self::UnknownEvent(_)
            | Self::UnmatchedTopic
            | Self::InvalidTopic
            | Self::InvalidFrame(_)
            | Self::BinaryPayload => Code::InvalidArgument,
            Self::PayloadTooLarge { .. } | Self::TooManyChannels => Code::ResourceExhausted,
            Self::MessageDeleted
            | Self::AnsweredElsewhere
            | Self::CallEnded
            | Self::ScreenInUse => Code::FailedPrecondition,
            Self::HuddleFull => Code::ResourceExhausted,
            Self::Closed => Code::Cancelled,
            Self::Internal => Code::Internal,
        }
    }

    /// The error a gRPC status stands for, for cross-service clients.
    pub fn from_status(status: &tonic::Status) -> Self {
        use tonic::Code;
        match status.code() {
            Code::NotFound => Self::NotFound,
            Code::PermissionDenied | Code::Unauthenticated => Self::Unauthorized,
            Code::InvalidArgument => Self::InvalidPayload(
                status
                    .message()
                    .strip_prefix("invalid payload: ")
                    .unwrap_or(status.message())
                    .to_owned(),
            ),
            Code::DeadlineExceeded => Self::Timeout,
            Code::ResourceExhausted => Self::RateLimited,
            Code::Unavailable | Code::Aborted | Code::Cancelled => Self::Unavailable,
            _ => Self::Internal,
        }
    }
}

impl From<ClientError> for tonic::Status {
    fn from(err: ClientError) -> Self {
        tonic::Status::new(err.grpc_code(), err.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_wire_texts() {
        let table = [
            (ClientError::Unauthorized, "unauthorized"),
            (ClientError::Forbidden, "forbidden"),
            (ClientError::NotFound, "not_found"),
            (ClientError::Busy, "busy"),
            (ClientError::RateLimited, "rate_limited"),
            (ClientError::Timeout, "timeout"),
            (ClientError::Unavailable, "service unavailable"),
            (ClientError::UnmatchedTopic, "unmatched topic"),
            (ClientError::InvalidTopic, "invalid topic"),
            (ClientError::TooManyChannels, "too many channels"),
            (
                ClientError::BinaryPayload,
                "binary payloads are not supported",
            ),
            (ClientError::MessageDeleted, "message deleted"),
            (ClientError::AnsweredElsewhere, "answered_elsewhere"),
            (ClientError::CallEnded, "call_ended"),
            (ClientError::HuddleFull, "huddle_full"),
            (ClientError::ScreenInUse, "screen_in_use"),
            (ClientError::Closed, "closed"),
            (ClientError::Internal, "internal error"),
        ];
        for (err, text) in table {
            assert_eq!(err.response(), json!({ "reason": text }));
        }
        assert_eq!(
            ClientError::invalid("content", "a string").response(),
            json!({"reason": "invalid payload: content must be a string"})
        );
        assert_eq!(
            ClientError::UnknownEvent("x:y".into()).response(),
            json!({"reason": "unknown event", "event": "x:y"})
        );
        assert_eq!(
            ClientError::PayloadTooLarge { limit: 10 }.response(),
            json!({"reason": "payload too large", "limit": 10})
        );
    }

    #[test]
    fn only_transient_reasons_are_retryable() {
        assert!(ClientError::Unavailable.retryable());
        assert!(ClientError::Timeout.retryable());
        assert!(ClientError::RateLimited.retryable());
        assert!(!ClientError::Unauthorized.retryable());
        assert!(!ClientError::invalid("x", "y").retryable());
    }

    #[test]
    fn grpc_codes_round_trip_for_cross_service_calls() {
        for err in [
            ClientError::NotFound,
            ClientError::Unauthorized,
            ClientError::Timeout,
            ClientError::Unavailable,
            ClientError::RateLimited,
        ] {
            let status = tonic::Status::from(err.clone());
            assert_eq!(ClientError::from_status(&status), err);
        }
        let status = tonic::Status::from(ClientError::invalid("userId", "an id"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            ClientError::from_status(&status),
            ClientError::invalid("userId", "an id")
        );
    }
}
