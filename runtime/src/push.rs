//! The push service's notices: what other services publish for push-svc
//! (`<prefix>.svc.push.<notice>`, no reply). In distributed mode a
//! JetStream work queue holds them until a push-svc replica has sent them.

/// A stored chat message (`MessagePush`), from chat-svc.
pub const MESSAGE_NOTICE: &str = "message";
/// A call ringing, missed or stopped (`CallPush`), from signaling-svc.
pub const CALL_NOTICE: &str = "call";
/// Characters of a message's content a push may show.
pub const MAX_PREVIEW_CHARS: usize = 200;

/// The first [`MAX_PREVIEW_CHARS`] characters of `content`.
pub fn preview(content: &str) -> String {
    content.chars().take(MAX_PREVIEW_CHARS).collect()
}
