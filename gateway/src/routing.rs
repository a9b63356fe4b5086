//! Which service owns a topic, and which topics are well-formed.
//!
//! A topic is `kind:id`. The kind picks the owning service (its commands go to
//! `<prefix>.cmd.<service>`); ids are `[A-Za-z0-9_-]{1,64}`, which makes every
//! topic a safe pair of subject tokens.

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
        service: "chat",
        notify_leave: false,
    },
    Route {
        kind: "webrtc",
        service: "signaling",
        notify_leave: true,
    },
    Route {
        kind: "huddle",
        service: "huddle",
        notify_leave: true,
    },
];

#[derive(Debug, PartialEq, Eq)]
pub enum TopicError {
    /// No channel kind matches: Phoenix answers `unmatched topic`.
    Unmatched,
    /// The kind exists but the id is malformed.
    Invalid,
}

pub use quckchat_runtime::ids::valid_id;

/// Finds the route of `topic` and checks its id.
pub fn route(topic: &str) -> Result<&'static Route, TopicError> {
    let (kind, id) = topic.split_once(':').ok_or(TopicError::Unmatched)?;
    let route = ROUTES
        .iter()
        .find(|r| r.kind == kind)
        .ok_or(TopicError::Unmatched)?;
    if valid_id(id) {
        Ok(route)
    } else {
        Err(TopicError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_validates() {
        assert_eq!(route("chat:c1").unwrap().service, "chat");
        assert_eq!(route("webrtc:lobby").unwrap().service, "signaling");
        assert_eq!(
            route("huddle:65a1b2c3d4e5f60718293a4b").unwrap().service,
            "huddle"
        );
        assert_eq!(route("foo:bar"), Err(TopicError::Unmatched));
        assert_eq!(route("chat"), Err(TopicError::Unmatched));
        assert_eq!(route("chat:"), Err(TopicError::Invalid));
        assert_eq!(route("chat:bad id!"), Err(TopicError::Invalid));
        assert_eq!(route("chat:a.b"), Err(TopicError::Invalid));
        assert_eq!(
            route(&format!("chat:{}", "a".repeat(65))),
            Err(TopicError::Invalid)
        );
        assert!(route(&format!("chat:{}", "a".repeat(64))).is_ok());
    }
}
