//! What push-svc is asked to push, as it arrives on the bus
//! (`<prefix>.svc.push.<notice>`).

use prost::Message as _;
use quckchat_proto::bus::{CallPush, MessagePush};
use quckchat_proto::push::NotifyRequest;
use quckchat_runtime::push::{CALL_NOTICE, MESSAGE_NOTICE};

/// `Notify` from the gRPC API, queued like the others.
pub const NOTIFY_NOTICE: &str = "notify";

#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    Message(MessagePush),
    Call(CallPush),
    Notify(NotifyRequest),
}

impl Job {
    /// Decodes a notice by its name (the subject's last token).
    pub fn decode(notice: &str, payload: &[u8]) -> Result<Self, String> {
        let err = |e: prost::DecodeError| format!("undecodable {notice} notice: {e}");
        match notice {
            MESSAGE_NOTICE => MessagePush::decode(payload).map(Job::Message).map_err(err),
            CALL_NOTICE => CallPush::decode(payload).map(Job::Call).map_err(err),
            NOTIFY_NOTICE => NotifyRequest::decode(payload).map(Job::Notify).map_err(err),
            other => Err(format!("unknown push notice {other:?}")),
        }
    }

    pub fn notice(&self) -> &'static str {
        match self {
            Self::Message(_) => MESSAGE_NOTICE,
            Self::Call(_) => CALL_NOTICE,
            Self::Notify(_) => NOTIFY_NOTICE,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Message(m) => m.encode_to_vec(),
            Self::Call(c) => c.encode_to_vec(),
            Self::Notify(n) => n.encode_to_vec(),
        }
    }
}
