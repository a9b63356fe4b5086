//! The two wire protocols the load generator speaks, reduced to what the
//! scenarios need: handshake, join, send, heartbeat, and recognising a
//! delivery, an acknowledgement or a ping in an incoming text frame.
//!
//! - Phoenix Channels, serializer 2.0.0 (QuckChat): `[join_ref, ref, topic,
//!   event, payload]`; join `phx_join`, send `message:send`, broadcast
//!   `message:new`, client heartbeat on topic `phoenix`.
//! - Engine.IO v4 / Socket.IO v5 (the Node peer): open packet `0{...}`,
//!   namespace connect `40`, events `42[...]` with ack ids (`42<id>[...]` →
//!   `43<id>[...]`), server ping `2` answered by client pong `3`.
//!
//! A sent message's `content` is `bench:<unix nanos>[:padding]`; a delivery
//! is recognised by finding that content, without parsing the whole frame.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Marker at the start of every content the bench sends.
pub const CONTENT_PREFIX: &str = "bench:";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Phoenix,
    SocketIo,
}

/// What an incoming text frame means to the bench.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A broadcast of a bench message, stamped when it was due to be sent.
    Delivery {
        sent_ns: u64,
    },
    /// The reply to a push (join or send) with this ref / ack id.
    Ack {
        reference: u64,
        ok: bool,
        reason: Option<String>,
    },
    /// Socket.IO server ping: answer with [`Dialect::pong`].
    Ping,
    Other,
}

impl Dialect {
    /// Path and query of the WebSocket endpoint.
    pub fn path(self, token: &str) -> String {
        match self {
            Dialect::Phoenix => format!("/socket/websocket?vsn=2.0.0&token={token}"),
            Dialect::SocketIo => "/socket.io/?EIO=4&transport=websocket".to_owned(),
        }
    }

    /// Frames a client must exchange after the WebSocket opens and before it
    /// may join: Socket.IO waits for the open packet and connects to `/`.
    pub fn needs_namespace_connect(self) -> bool {
        self == Dialect::SocketIo
    }

    pub fn namespace_connect(self) -> &'static str {
        "40"
    }

    /// Is this the server's answer to the namespace connect?
    pub fn is_namespace_connected(self, text: &str) -> bool {
        text.starts_with("40")
    }

    pub fn join(self, topic: &str, reference: u64) -> String {
        match self {
            Dialect::Phoenix => {
                format!(r#"["{reference}","{reference}","{topic}","phx_join",{{}}]"#)
            }
            Dialect::SocketIo => format!(r#"42{reference}["join","{topic}"]"#),
        }
    }

    /// A send of `content` (plain ASCII, no escaping needed) on `topic`.
    pub fn send(self, topic: &str, join_ref: u64, reference: u64, content: &str) -> String {
        match self {
            Dialect::Phoenix => format!(
                r#"["{join_ref}","{reference}","{topic}","message:send",{{"type":"text","content":"{content}"}}]"#
            ),
            Dialect::SocketIo => format!(r#"42{reference}["send","{topic}","{content}"]"#),
        }
    }

    /// The client heartbeat, where the protocol has one (Phoenix); its ref is
    /// not a number, so its reply is never taken for a send's.
    pub fn heartbeat(self) -> Option<&'static str> {
        match self {
            Dialect::Phoenix => Some(r#"[null,"hb","phoenix","heartbeat",{}]"#),
            Dialect::SocketIo => None,
        }
    }

    pub fn pong(self) -> &'static str {
        "3"
    }

    pub fn parse(self, text: &str) -> Incoming {
        match self {
            Dialect::Phoenix => parse_phoenix(text),
            Dialect::SocketIo => parse_socketio(text),
        }
    }
}

/// `bench:<nanos>[:padding]`.
pub fn content(sent_ns: u64, padding: usize) -> String {
    let mut s = format!("{CONTENT_PREFIX}{sent_ns}");
    if padding > 0 {
        s.push(':');
        s.extend(std::iter::repeat_n('x', padding));
    }
    s
}

/// The send stamp in the first `"content":"bench:<nanos>` of a frame.
fn stamp_in(text: &str) -> Option<u64> {
    let key = r#""content":""#;
    let at = text.find(key)? + key.len();
    let rest = text[at..].strip_prefix(CONTENT_PREFIX)?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn reason_in(text: &str) -> Option<String> {
    let key = r#""reason":""#;
    let at = text.find(key)? + key.len();
    let end = text[at..].find('"')?;
    Some(text[at..at + end].to_owned())
}

fn parse_phoenix(text: &str) -> Incoming {
    type Frame<'a> = (
        Option<&'a str>,
        Option<&'a str>,
        &'a str,
        &'a str,
        &'a RawValue,
    );
    let Ok((_join_ref, reference, _topic, event, payload)) = serde_json::from_str::<Frame>(text)
    else {
        return Incoming::Other;
    };
    match event {
        "message:new" => match stamp_in(payload.get()) {
            Some(sent_ns) => Incoming::Delivery { sent_ns },
            None => Incoming::Other,
        },
        "phx_reply" => match reference.and_then(|r| r.parse().ok()) {
            Some(reference) => {
                let ok = payload.get().starts_with(r#"{"status":"ok""#)
                    || payload.get().contains(r#""status":"ok""#);
                Incoming::Ack {
                    reference,
                    ok,
                    reason: if ok { None } else { reason_in(payload.get()) },
                }
            }
            None => Incoming::Other,
        },
        _ => Incoming::Other,
    }
}

fn parse_socketio(text: &str) -> Incoming {
    if text == "2" {
        return Incoming::Ping;
    }
    if let Some(event) = text.strip_prefix("42") {
        return match stamp_in(event) {
            Some(sent_ns) if event.starts_with(r#"["message""#) => Incoming::Delivery { sent_ns },
            _ => Incoming::Other,
        };
    }
    if let Some(ack) = text.strip_prefix("43") {
        let digits = ack.find('[').unwrap_or(ack.len());
        if let Ok(reference) = ack[..digits].parse() {
            let ok = ack[digits..].contains(r#""ok":true"#);
            return Incoming::Ack {
                reference,
                ok,
                reason: if ok { None } else { reason_in(ack) },
            };
        }
    }
    Incoming::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phoenix_delivery_reply_and_error() {
        let d = Dialect::Phoenix;
        let bcast = r#"[null,null,"chat:c1","message:new",{"message":{"id":"m","seq":3,"content":"bench:1234:xx","type":"text"}}]"#;
        assert_eq!(d.parse(bcast), Incoming::Delivery { sent_ns: 1234 });
        let reply = r#"["1","7","chat:c1","phx_reply",{"status":"ok","response":{"message":{"content":"bench:5"}}}]"#;
        assert_eq!(
            d.parse(reply),
            Incoming::Ack {
                reference: 7,
                ok: true,
                reason: None
            }
        );
        let err = r#"["1","8","chat:c1","phx_reply",{"status":"error","response":{"reason":"rate_limited"}}]"#;
        assert_eq!(
            d.parse(err),
            Incoming::Ack {
                reference: 8,
                ok: false,
                reason: Some("rate_limited".into())
            }
        );
        let hb = r#"[null,"hb","phoenix","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(d.parse(hb), Incoming::Other);
    }

    #[test]
    fn socketio_ping_event_and_ack() {
        let d = Dialect::SocketIo;
        assert_eq!(d.parse("2"), Incoming::Ping);
        assert_eq!(
            d.parse(r#"42["message",{"content":"bench:99"}]"#),
            Incoming::Delivery { sent_ns: 99 }
        );
        assert_eq!(
            d.parse(r#"4312[{"ok":true}]"#),
            Incoming::Ack {
                reference: 12,
                ok: true,
                reason: None
            }
        );
        assert!(d.is_namespace_connected(r#"40{"sid":"x"}"#));
    }

    #[test]
    fn frames_round_trip_through_the_parser() {
        let c = content(42, 3);
        assert_eq!(c, "bench:42:xxx");
        let f = Dialect::Phoenix.send("chat:c", 1, 2, &c);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v[4]["content"], "bench:42:xxx");
        assert_eq!(stamp_in(&f), Some(42));
    }
}
