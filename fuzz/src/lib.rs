//! The bodies of QuckChat's fuzz targets, one function per target in
//! `fuzz_targets/`. Each takes bytes a client (or a peer on the bus) could
//! send and checks the invariant of every decoder of untrusted input: it
//! returns (no panic, no abort) in bounded time, with an answer that is
//! itself well formed. scripts/fuzz.sh runs them; docs/security.md#fuzzing
//! says what each covers.

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::Stream;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use prost::Message as _;
use quckchat_chat::service::ChatService;
use quckchat_chat::store::{ChatStore, EmbeddedStore};
use quckchat_gateway::frame::{
    decode_binary_push, decode_text, encode, reply_payload, FrameError, InFrame, Vsn,
};
use quckchat_gateway::ws::WebSocket;
use quckchat_proto::bus::{command_reply, ClientCommand, CommandReply};
use quckchat_runtime::auth::JwtVerifier;
use quckchat_runtime::bus::{MemoryBus, Subjects};
use quckchat_runtime::errors::ClientError;
use quckchat_runtime::service::{answer, Payload};
use serde_json::Value;

/// Splits off the first byte, which targets use to pick a mode.
fn mode(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(&m, rest)| (m, rest))
}

fn assert_json(what: &str, text: &[u8]) {
    if let Err(err) = serde_json::from_slice::<Value>(text) {
        panic!(
            "{what} is not JSON ({err}): {:?}",
            String::from_utf8_lossy(text)
        );
    }
}

// ---------------------------------------------------------------- frames

fn same(a: &InFrame, b: &InFrame) -> bool {
    a.join_ref == b.join_ref
        && a.ref_ == b.ref_
        && a.topic == b.topic
        && a.event == b.event
        && a.payload.get() == b.payload.get()
}

/// `frame_text`: the first byte picks the serializer (even 2.0.0, odd
/// 1.0.0), the rest is the text frame. A decoded frame re-encodes to one
/// that decodes the same; a refusal the gateway answers encodes to JSON.
pub fn frame_text(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let vsn = if m & 1 == 0 { Vsn::V2 } else { Vsn::V1 };
    match decode_text(vsn, text) {
        Ok(f) => {
            let again = encode(
                vsn,
                f.join_ref.as_deref(),
                f.ref_.as_deref(),
                &f.topic,
                &f.event,
                f.payload.get(),
            );
            match decode_text(vsn, &again) {
                Ok(g) => assert!(same(&f, &g), "{f:?} re-decoded as {g:?}"),
                Err(err) => panic!("{f:?} re-encoded as {again:?}, refused: {err:?}"),
            }
        }
        Err(FrameError::Invalid {
            join_ref,
            ref_,
            topic,
            reason,
        }) => {
            let response = serde_json::json!({ "reason": reason }).to_string();
            let reply = encode(
                vsn,
                join_ref.as_deref(),
                Some(&ref_),
                &topic,
                "phx_reply",
                &reply_payload(false, &response),
            );
            assert_json("an error reply", reply.as_bytes());
        }
        Err(FrameError::Unusable) => {}
    }
}

/// `frame_binary`: the bytes are a binary frame. A decoded push names
/// fields that all lie within the frame.
pub fn frame_binary(data: &[u8]) {
    if let Some(p) = decode_binary_push(data) {
        let fields = p.join_ref.as_deref().map_or(0, str::len)
            + p.ref_.len()
            + p.topic.len()
            + p.event.len();
        assert!(5 + fields <= data.len(), "{p:?} from {} bytes", data.len());
    }
}

// ---------------------------------------------------------------- WebSocket

/// A connection that delivers `input` `chunk` bytes at a time, then ends,
/// and takes whatever is written.
struct Scripted<'a> {
    input: &'a [u8],
    chunk: usize,
    written: usize,
}

impl tokio::io::AsyncRead for Scripted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.input.len()).min(buf.remaining());
        let (now, rest) = self.input.split_at(n);
        buf.put_slice(now);
        self.input = rest;
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Scripted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.written += buf.len();
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `ws_frames`: the first byte sets how many bytes a read returns (1-256),
/// the rest is what a client sends after the upgrade. The socket's messages
/// carry no more bytes than were sent, the socket ends (an error or the
/// close) by the end of the input, and nothing is read after it ends.
pub fn ws_frames(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    let chunk = usize::from(m) + 1;
    let io = Scripted {
        input: rest,
        chunk,
        written: 0,
    };
    let mut ws = WebSocket::new(io, 4096, chunk);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut carried = 0;
    let mut ended = false;
    // Each message takes at least a frame header (2 bytes) of the input.
    for _ in 0..=rest.len() {
        match Pin::new(&mut ws).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(message))) => {
                assert!(!ended, "a message after the socket ended: {message:?}");
                carried += message.into_data().len();
            }
            Poll::Ready(Some(Err(_)) | None) => {
                ended = true;
                break;
            }
            Poll::Pending => panic!("a scripted connection never waits"),
        }
    }
    assert!(ended, "{} bytes did not end the socket", rest.len());
    assert!(carried <= rest.len(), "{carried} bytes from {}", rest.len());
    assert!(matches!(
        Pin::new(&mut ws).poll_next(&mut cx),
        Poll::Ready(None)
    ));
}

// ---------------------------------------------------------------- JWT

/// The secret of the `jwt` target (any fixed value does).
pub const FUZZ_SECRET: &str = "quckchat-fuzz-secret";

static VERIFIER: LazyLock<JwtVerifier> = LazyLock::new(|| JwtVerifier::hs256(FUZZ_SECRET));

/// `jwt`: the first byte picks what the rest is —
/// - `m % 3 == 0`: a whole token string, as a client sends it;
/// - `m % 3 == 1`: the claims segment (raw bytes, base64url-encoded here) of
///   a token with a valid HS256 header and signature, so the claim checks
///   (exp, nbf, user id) see arbitrary JSON;
/// - `m % 3 == 2`: header and claims split at the first `0xff`, signed.
///
/// Whatever the token, `verify` answers; an accepted token names a user and
/// had a signature made with the secret.
pub fn jwt(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    let (token, signed_claims) = match m % 3 {
        0 => match std::str::from_utf8(rest) {
            Ok(token) => (token.to_owned(), None),
            Err(_) => return,
        },
        1 => (signed(br#"{"alg":"HS256","typ":"JWT"}"#, rest), Some(rest)),
        _ => {
            let (header, claims) = match rest.iter().position(|&b| b == 0xff) {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (rest, &b"{}"[..]),
            };
            (signed(header, claims), Some(claims))
        }
    };
    let Ok(identity) = VERIFIER.verify(&token) else {
        return;
    };
    assert!(!identity.user_id.is_empty(), "{identity:?} from {token:?}");
    match signed_claims {
        // Accepted claims are a JSON object with a numeric exp.
        Some(claims) => {
            let claims: Value = serde_json::from_slice(claims)
                .unwrap_or_else(|e| panic!("accepted claims are not JSON ({e}): {token:?}"));
            assert!(
                claims.get("exp").is_some_and(Value::is_number),
                "accepted without a numeric exp: {claims}"
            );
        }
        // A token string is accepted only with a signature made with the
        // secret (as the seeds have; the fuzzer will not forge HMAC).
        None => {
            let key = jsonwebtoken::DecodingKey::from_secret(FUZZ_SECRET.as_bytes());
            let signed = token.rsplit_once('.').is_some_and(|(message, signature)| {
                jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key, Algorithm::HS256)
                    .unwrap_or(false)
            });
            assert!(signed, "accepted without the secret's signature: {token:?}");
        }
    }
}

#[allow(clippy::expect_used)]
fn signed(header: &[u8], claims: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let key = EncodingKey::from_secret(FUZZ_SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
        .expect("HMAC signing does not fail");
    format!("{message}.{signature}")
}

/// Seconds since the epoch (for seeds with a live `exp`).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------- payloads

/// Field names the services read, plus the empty name.
const FIELDS: &[&str] = &[
    "",
    "content",
    "type",
    "conversationId",
    "clientMessageId",
    "replyTo",
    "metadata",
    "messageId",
    "emoji",
    "lastSeq",
    "seq",
    "before",
    "limit",
    "deviceId",
];

fn check_refusal(err: ClientError) {
    let reason = err.reason();
    assert!(!reason.is_empty());
    assert_json("a refusal", err.response().to_string().as_bytes());
}

/// `payload`: the bytes are a push's payload. `Payload::parse` and every
/// accessor answer for every field the payload has and the services read;
/// chat's `parse_send` accepts only what its limits allow.
pub fn payload(data: &[u8]) {
    let p = match Payload::parse(data) {
        Ok(p) => p,
        Err(err) => return check_refusal(err),
    };
    let present: Vec<String> = p.0.keys().cloned().collect();
    for field in FIELDS
        .iter()
        .copied()
        .chain(present.iter().map(String::as_str))
    {
        let _ = p.get(field);
        for result in [
            p.opt_str(field).map(drop),
            p.str(field).map(drop),
            p.opt_u64(field).map(drop),
            p.opt_bool(field).map(drop),
        ] {
            if let Err(err) = result {
                check_refusal(err);
            }
        }
        match p.id(field) {
            Ok(id) => assert!(quckchat_runtime::ids::valid_id(id), "{id:?}"),
            Err(err) => check_refusal(err),
        }
    }
    match quckchat_chat::payload::parse_send("c1", "u1", &p) {
        Ok(m) => {
            use quckchat_chat::payload::{MAX_CLIENT_MESSAGE_ID, MAX_CONTENT_CHARS};
            assert!(m.content.chars().count() <= MAX_CONTENT_CHARS);
            assert!(m
                .client_message_id
                .as_ref()
                .is_none_or(|c| !c.is_empty() && c.len() <= MAX_CLIENT_MESSAGE_ID));
            assert_eq!(
                (m.conversation_id.as_str(), m.sender_id.as_str()),
                ("c1", "u1")
            );
        }
        Err(err) => check_refusal(err.into()),
    }
}

// ---------------------------------------------------------------- commands

/// A chat service over the embedded store (in a temporary directory) and an
/// in-process bus, with conversation `c1` of members `u1` and `u2`.
struct Chat {
    rt: tokio::runtime::Runtime,
    service: ChatService,
    _dir: tempfile::TempDir,
}

#[allow(clippy::expect_used)]
static CHAT: LazyLock<Chat> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // RAM-backed when available: every accepted send is a commit.
    let dir = tempfile::Builder::new()
        .prefix("quckchat-fuzz-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temporary directory");
    let store = EmbeddedStore::open(dir.path()).expect("embedded store");
    rt.block_on(store.upsert_conversation("c1", &["u1".to_owned(), "u2".to_owned()]))
        .expect("conversation c1");
    let service = ChatService::new(
        Arc::new(store),
        Arc::new(MemoryBus::new()),
        Subjects::new("fuzz"),
    );
    Chat {
        rt,
        service,
        _dir: dir,
    }
});

const TOPICS: &[&str] = &[
    "chat:c1",
    "chat:c1",
    "chat:c1",
    "chat:c2",
    "chat:",
    "chat:c1:x",
    "webrtc:lobby",
    "c1",
];

const EVENTS: &[&str] = &[
    "phx_join",
    "phx_leave",
    "message:send",
    "message:edit",
    "message:delete",
    "message:reaction:add",
    "message:reaction:remove",
    "typing:start",
    "typing:stop",
    "message:read",
    "message:history",
    "message:send",
    "message:send",
    "message:history",
    "heartbeat",
    "",
];

/// `chat_command`: a client command to the chat service, answered by
/// `runtime::service::answer` as the bus consumer does. First byte `0xff`:
/// the rest is a protobuf `ClientCommand` as the bus carries it. Otherwise
/// the byte picks the topic (bits 0–2), event (3–6) and whether the user
/// is a member (bit 7), and the rest is the payload. Every command gets a
/// reply whose response (and follow-ups) are JSON.
pub fn chat_command(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    let cmd = if m == 0xff {
        match ClientCommand::decode(rest) {
            Ok(cmd) => cmd,
            Err(_) => return,
        }
    } else {
        ClientCommand {
            conn_id: "k1".into(),
            user_id: if m & 0x80 == 0 { "u1" } else { "u9" }.into(),
            device_id: "d1".into(),
            topic: TOPICS[usize::from(m & 7)].into(),
            event: EVENTS[usize::from((m >> 3) & 15)].into(),
            payload: rest.to_vec(),
            node_id: "gw1".into(),
        }
    };
    let chat = &*CHAT;
    let reply: CommandReply = chat.rt.block_on(answer(&chat.service, cmd));
    assert_json("a reply", &reply.response);
    for f in &reply.followups {
        assert_json("a follow-up", &f.payload);
    }
    assert!(
        reply.status() == command_reply::Status::Ok || reply.followups.is_empty(),
        "a refusal with follow-ups"
    );
}
