//! What a chat payload must be: the checks of `message:send` (also used by
//! gRPC `PostMessage`) and of the fields other events share. Every refusal is
//! `invalid payload: …` naming the field (docs/protocol.md#errors).

use quckchat_runtime::ids::valid_id;
use quckchat_runtime::service::Payload;
use serde_json::Value;

use crate::service::ChatError;
use crate::store::{NewMessage, MESSAGE_TYPES};

/// Longest message content, in characters.
pub const MAX_CONTENT_CHARS: usize = 10_000;
/// Longest `clientMessageId`.
pub const MAX_CLIENT_MESSAGE_ID: usize = 128;
/// Largest `metadata`, encoded.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

pub(crate) fn invalid(msg: impl Into<String>) -> ChatError {
    ChatError::InvalidPayload(msg.into())
}

/// `content`: a string of at most [`MAX_CONTENT_CHARS`] characters.
pub(crate) fn content_field(p: &Payload) -> Result<String, ChatError> {
    let content = p.str("content")?;
    if content.chars().count() > MAX_CONTENT_CHARS {
        return Err(invalid(format!(
            "content exceeds {MAX_CONTENT_CHARS} characters"
        )));
    }
    Ok(content.to_owned())
}

/// `emoji`: one Unicode emoji (with skin tone or variation selector), or a
/// `:shortcode:` naming one.
pub(crate) fn emoji_field(p: &Payload) -> Result<String, ChatError> {
    let emoji = p.str("emoji")?;
    let known = emojis::get(emoji).is_some()
        || emoji
            .strip_prefix(':')
            .and_then(|s| s.strip_suffix(':'))
            .is_some_and(|code| emojis::get_by_shortcode(code).is_some());
    if known {
        Ok(emoji.to_owned())
    } else {
        Err(invalid("emoji must be a single emoji or a :shortcode:"))
    }
}

/// Metadata every store can keep as the client sent it: no `$` keys (MongoDB
/// operators), integers within 64-bit signed, nesting at most 16 deep.
fn check_metadata(v: &Value, depth: usize) -> Result<(), ChatError> {
    if depth > 16 {
        return Err(invalid("metadata is nested too deep"));
    }
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k.starts_with('$') {
                    return Err(invalid(format!(
                        "metadata keys must not start with $: {k:?}"
                    )));
                }
                check_metadata(v, depth + 1)?;
            }
            Ok(())
        }
        Value::Array(a) => a.iter().try_for_each(|v| check_metadata(v, depth + 1)),
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => Err(invalid(
            "metadata numbers must fit in 64-bit signed integers",
        )),
        _ => Ok(()),
    }
}

/// Validates a `message:send` payload.
pub fn parse_send(
    conversation_id: &str,
    user_id: &str,
    p: &Payload,
) -> Result<NewMessage, ChatError> {
    if let Some(cid) = p.opt_str("conversationId")? {
        if cid != conversation_id {
            return Err(invalid("conversationId does not match the topic"));
        }
    }
    let kind = p.str("type")?;
    if !MESSAGE_TYPES.contains(&kind) {
        return Err(invalid(format!(
            "type must be one of {}",
            MESSAGE_TYPES.join(", ")
        )));
    }
    let content = content_field(p)?;
    if kind == "text" && content.trim().is_empty() {
        return Err(invalid("content must not be empty"));
    }
    let client_message_id = p.opt_str("clientMessageId")?;
    if client_message_id.is_some_and(|c| c.is_empty() || c.len() > MAX_CLIENT_MESSAGE_ID) {
        return Err(invalid(format!(
            "clientMessageId must be 1 to {MAX_CLIENT_MESSAGE_ID} characters"
        )));
    }
    let reply_to = p.opt_str("replyTo")?;
    if reply_to.is_some_and(|r| !valid_id(r)) {
        return Err(invalid("replyTo must name a message of this conversation"));
    }
    let metadata = match p.get("metadata") {
        None => None,
        Some(Value::Object(m)) => {
            check_metadata(&Value::Object(m.clone()), 0)?;
            if serde_json::to_vec(m).map_or(usize::MAX, |v| v.len()) > MAX_METADATA_BYTES {
                return Err(invalid(format!(
                    "metadata exceeds {MAX_METADATA_BYTES} bytes"
                )));
            }
            Some(m.clone())
        }
        Some(_) => return Err(invalid("metadata must be an object")),
    };
    Ok(NewMessage {
        conversation_id: conversation_id.to_owned(),
        sender_id: user_id.to_owned(),
        kind: kind.to_owned(),
        content,
        client_message_id: client_message_id.map(str::to_owned),
        reply_to: reply_to.map(str::to_owned),
        metadata,
    })
}
