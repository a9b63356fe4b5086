//! The one table of channel kinds and the services that own them: the
//! gateway routes topics by it, and each service takes its name (its bus
//! subject `<prefix>.cmd.<service>` and queue group) from it.
//!
//! A topic is `kind:id`; ids are `[A-Za-z0-9_-]{1,64}` ([`crate::ids`]),
//! which makes every topic a safe pair of subject tokens.

use crate::errors::ClientError;
use crate::ids::valid_id;

/// Service names on the bus.
pub const CHAT: &str = "chat";
pub const SIGNALING: &str = "signaling";
pub const HUDDLE: &str = "huddle";
pub const PRESENCE: &str = "presence";
/// No topics: it takes notices only (`crate::push`).
pub const PUSH: &str = "push";

/// A channel kind served by one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub kind: &'static str,
    pub service: &'static str,
    /// Whether the service is told when a socket leaves the channel (e.g. a
    /// huddle participant left). Chat does not need it.
    pub notify_leave: bool,
}

/// Every channel kind of the protocol (docs/protocol.md#topics).
pub const ROUTES: &[Route] = &[
    Route {
        kind: "chat",
        service: CHAT,
        notify_leave: false,
    },
    Route {
        kind: "webrtc",
        service: SIGNALING,
        notify_leave: true,
    },
    Route {
        kind: "huddle",
        service: HUDDLE,
        notify_leave: true,
    },
];

/// Finds the route of `topic` and checks its id: `unmatched topic` when no
/// kind matches (Phoenix's wording), `invalid topic` for a malformed id.
pub fn route(topic: &str) -> Result<&'static Route, ClientError> {
    let (kind, id) = topic.split_once(':').ok_or(ClientError::UnmatchedTopic)?;
    let route = ROUTES
        .iter()
        .find(|r| r.kind == kind)
        .ok_or(ClientError::UnmatchedTopic)?;
    if valid_id(id) {
        Ok(route)
    } else {
        Err(ClientError::InvalidTopic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_validates() {
        assert_eq!(route("chat:c1").unwrap().service, CHAT);
        assert_eq!(route("webrtc:lobby").unwrap().service, SIGNALING);
        assert_eq!(
            route("huddle:65a1b2c3d4e5f60718293a4b").unwrap().service,
            HUDDLE
        );
        assert_eq!(route("foo:bar"), Err(ClientError::UnmatchedTopic));
        assert_eq!(route("chat"), Err(ClientError::UnmatchedTopic));
        assert_eq!(route("chat:"), Err(ClientError::InvalidTopic));
        assert_eq!(route("chat:bad id!"), Err(ClientError::InvalidTopic));
        assert_eq!(route("chat:a.b"), Err(ClientError::InvalidTopic));
        assert_eq!(
            route(&format!("chat:{}", "a".repeat(65))),
            Err(ClientError::InvalidTopic)
        );
        assert!(route(&format!("chat:{}", "a".repeat(64))).is_ok());
    }
}
