//! Phoenix frames: decoding client frames and encoding server frames for the
//! two serializers the official clients speak.
//!
//! - `2.0.0` (default): text frames `[join_ref, ref, topic, event, payload]`;
//!   binary frames carry a kind byte (0 push, 1 reply, 2 broadcast) and
//!   length-prefixed fields (see phoenix `serializer.js`).
//! - `1.0.0`: text frames `{"topic","event","payload","ref","join_ref"}`.
//!
//! Payloads stay raw JSON: the gateway never re-encodes what a client or a
//! service wrote.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Serializer version, from the `vsn` connect parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    V1,
    V2,
}

impl Vsn {
    pub fn parse(vsn: Option<&str>) -> Option<Self> {
        match vsn {
            None | Some("2.0.0") => Some(Self::V2),
            Some("1.0.0") => Some(Self::V1),
            Some(_) => None,
        }
    }
}

/// A client frame.
#[derive(Debug)]
pub struct InFrame {
    pub join_ref: Option<String>,
    pub ref_: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Box<RawValue>,
}

/// Why a frame could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Nothing to answer to: dropped and counted.
    Unusable,
    /// A ref and topic were readable: answered with an error reply.
    Invalid {
        join_ref: Option<String>,
        ref_: String,
        topic: String,
        reason: String,
    },
}

#[derive(Deserialize)]
struct V1Frame {
    topic: String,
    event: String,
    payload: Box<RawValue>,
    #[serde(rename = "ref")]
    ref_: Option<String>,
    join_ref: Option<String>,
}

/// Decodes a text frame.
pub fn decode_text(vsn: Vsn, text: &str) -> Result<InFrame, FrameError> {
    match vsn {
        Vsn::V2 => decode_v2(text),
        Vsn::V1 => decode_v1(text),
    }
}

fn decode_v2(text: &str) -> Result<InFrame, FrameError> {
    let parts: Vec<&RawValue> = serde_json::from_str(text).map_err(|_| FrameError::Unusable)?;
    let string_at = |i: usize| -> Option<String> {
        parts
            .get(i)
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
    };
    let nullable_at = |i: usize| -> Result<Option<String>, ()> {
        match parts.get(i) {
            Some(v) if v.get() == "null" => Ok(None),
            Some(v) => serde_json::from_str::<String>(v.get())
                .map(Some)
                .map_err(|_| ()),
            None => Err(()),
        }
    };
    let invalid = |reason: &str| match (string_at(1), string_at(2)) {
        (Some(ref_), Some(topic)) => FrameError::Invalid {
            join_ref: string_at(0),
            ref_,
            topic,
            reason: reason.to_owned(),
        },
        _ => FrameError::Unusable,
    };
    if parts.len() != 5 {
        return Err(invalid("expected [join_ref, ref, topic, event, payload]"));
    }
    let join_ref = nullable_at(0).map_err(|()| invalid("join_ref must be a string or null"))?;
    let ref_ = nullable_at(1).map_err(|()| FrameError::Unusable)?;
    let topic = string_at(2).ok_or(FrameError::Unusable)?;
    let event = string_at(3).ok_or_else(|| invalid("event must be a string"))?;
    let payload =
        RawValue::from_string(parts[4].get().to_owned()).map_err(|_| FrameError::Unusable)?;
    Ok(InFrame {
        join_ref,
        ref_,
        topic,
        event,
        payload,
    })
}

fn decode_v1(text: &str) -> Result<InFrame, FrameError> {
    match serde_json::from_str::<V1Frame>(text) {
        Ok(f) => Ok(InFrame {
            join_ref: f.join_ref,
            ref_: f.ref_,
            topic: f.topic,
            event: f.event,
            payload: f.payload,
        }),
        Err(e) => {
            #[derive(Deserialize)]
            struct Loose {
                topic: Option<String>,
                #[serde(rename = "ref")]
                ref_: Option<String>,
                join_ref: Option<String>,
            }
            match serde_json::from_str::<Loose>(text) {
                Ok(Loose {
                    topic: Some(topic),
                    ref_: Some(ref_),
                    join_ref,
                }) => Err(FrameError::Invalid {
                    join_ref,
                    ref_,
                    topic,
                    reason: e.to_string(),
                }),
                _ => Err(FrameError::Unusable),
            }
        }
    }
}

/// The header of a binary push (kind 0), enough to answer it.
#[derive(Debug, PartialEq, Eq)]
pub struct BinaryPush {
    pub join_ref: Option<String>,
    pub ref_: String,
    pub topic: String,
    pub event: String,
}

/// Decodes the header of a 2.0.0 binary push:
/// `[0][join_ref_len][ref_len][topic_len][event_len][join_ref][ref][topic][event][payload…]`.
pub fn decode_binary_push(data: &[u8]) -> Option<BinaryPush> {
    let (&kind, rest) = data.split_first()?;
    if kind != 0 || rest.len() < 4 {
        return None;
    }
    let lens = [rest[0], rest[1], rest[2], rest[3]].map(usize::from);
    let mut at = 4;
    let mut fields = Vec::with_capacity(4);
    for len in lens {
        let field = rest.get(at..at + len)?;
        fields.push(std::str::from_utf8(field).ok()?.to_owned());
        at += len;
    }
    let event = fields.pop()?;
    let topic = fields.pop()?;
    let ref_ = fields.pop()?;
    let join_ref = fields.pop().filter(|s| !s.is_empty());
    Some(BinaryPush {
        join_ref,
        ref_,
        topic,
        event,
    })
}

/// Encodes a server frame. `payload` must be valid JSON.
pub fn encode(
    vsn: Vsn,
    join_ref: Option<&str>,
    ref_: Option<&str>,
    topic: &str,
    event: &str,
    payload: &str,
) -> String {
    let q = |s: Option<&str>| match s {
        Some(s) => json_string(s),
        None => "null".to_owned(),
    };
    match vsn {
        Vsn::V2 => format!(
            "[{},{},{},{},{}]",
            q(join_ref),
            q(ref_),
            json_string(topic),
            json_string(event),
            payload
        ),
        Vsn::V1 => format!(
            r#"{{"topic":{},"event":{},"payload":{},"ref":{},"join_ref":{}}}"#,
            json_string(topic),
            json_string(event),
            payload,
            q(ref_),
            q(join_ref)
        ),
    }
}

/// The payload of a `phx_reply`: `{"status":…,"response":…}`.
pub fn reply_payload(ok: bool, response: &str) -> String {
    let status = if ok { "ok" } else { "error" };
    format!(r#"{{"status":"{status}","response":{response}}}"#)
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_v2_push() {
        let f = decode_text(
            Vsn::V2,
            r#"["1","2","chat:c1","message:send",{"content":"hi"}]"#,
        )
        .unwrap();
        assert_eq!(f.join_ref.as_deref(), Some("1"));
        assert_eq!(f.ref_.as_deref(), Some("2"));
        assert_eq!(f.topic, "chat:c1");
        assert_eq!(f.event, "message:send");
        assert_eq!(f.payload.get(), r#"{"content":"hi"}"#);
        let hb = decode_text(Vsn::V2, r#"[null,"9","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(hb.join_ref, None);
    }

    #[test]
    fn v2_errors_answer_only_with_a_ref() {
        assert_eq!(
            decode_text(Vsn::V2, "not json").unwrap_err(),
            FrameError::Unusable
        );
        assert_eq!(
            decode_text(Vsn::V2, r#"{"a":1}"#).unwrap_err(),
            FrameError::Unusable
        );
        assert_eq!(
            decode_text(Vsn::V2, r#"[1,2]"#).unwrap_err(),
            FrameError::Unusable
        );
        match decode_text(Vsn::V2, r#"[null,"7","phoenix","heartbeat"]"#).unwrap_err() {
            FrameError::Invalid {
                ref_,
                topic,
                reason,
                ..
            } => {
                assert_eq!((ref_.as_str(), topic.as_str()), ("7", "phoenix"));
                assert!(!reason.is_empty(), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_text(Vsn::V2, r#"["1","7","chat:x",5,{}]"#).unwrap_err(),
            FrameError::Invalid { .. }
        ));
    }

    #[test]
    fn decodes_v1_and_its_errors() {
        let f = decode_text(
            Vsn::V1,
            r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1","join_ref":null}"#,
        )
        .unwrap();
        assert_eq!(
            (f.topic.as_str(), f.event.as_str(), f.ref_.as_deref()),
            ("phoenix", "heartbeat", Some("1"))
        );
        assert!(matches!(
            decode_text(Vsn::V1, r#"{"topic":"phoenix","ref":"3"}"#).unwrap_err(),
            FrameError::Invalid { .. }
        ));
        assert_eq!(
            decode_text(Vsn::V1, r#"[1]"#).unwrap_err(),
            FrameError::Unusable
        );
    }

    #[test]
    fn encodes_both_serializers() {
        let p = reply_payload(true, "{}");
        assert_eq!(
            encode(Vsn::V2, None, Some("1"), "phoenix", "phx_reply", &p),
            r#"[null,"1","phoenix","phx_reply",{"status":"ok","response":{}}]"#
        );
        let v1 = encode(Vsn::V1, Some("3"), None, "chat:\"x", "e", "[]");
        let back: serde_json::Value = serde_json::from_str(&v1).unwrap();
        assert_eq!(back["topic"], "chat:\"x");
        assert_eq!(back["join_ref"], "3");
        assert!(back["ref"].is_null());
    }

    #[test]
    fn decodes_binary_push_header() {
        let mut data = vec![0u8, 1, 1, 7, 4];
        data.extend_from_slice(b"12chat:c1ping");
        data.extend_from_slice(&[0xde, 0xad]);
        let p = decode_binary_push(&data).unwrap();
        assert_eq!(p.join_ref.as_deref(), Some("1"));
        assert_eq!(
            (p.ref_.as_str(), p.topic.as_str(), p.event.as_str()),
            ("2", "chat:c1", "ping")
        );
        assert_eq!(decode_binary_push(&[0, 9, 9, 9, 9, 1]), None);
        assert_eq!(decode_binary_push(&[2]), None);
    }
}
