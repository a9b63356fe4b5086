//! The WebSocket transport of a client socket (RFC 6455, server side).
//!
//! A socket holds no buffer while idle: bytes are read into the worker
//! thread's read buffer and a socket keeps only what it has not parsed yet (a
//! partial frame, or the frames after the one returned), released once
//! parsed; outgoing frames are gathered in a buffer released once written.
//! tungstenite (behind axum's WebSocket) keeps a read buffer and a write
//! buffer as large as its largest frame for the socket's life, ~2 KiB of an
//! idle socket's ~8.6 KiB (bench/ANALYSIS.md). Frame headers are parsed and
//! written by tungstenite's frame module; this module keeps the buffers and
//! the message rules (fragments, control frames, the closing handshake).
//!
//! Served to [`crate::socket`] as a `Stream` of [`Message`]s and a `Sink`,
//! the shape of axum's WebSocket, which the socket's tests also provide.

use std::cell::RefCell;
use std::io::{self, Cursor};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Sink, Stream};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// The worker thread's read buffer: every socket served on the thread reads
/// into it, one at a time.
const THREAD_READ_BUFFER: usize = 64 * 1024;

thread_local! {
    static READ_BUFFER: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; THREAD_READ_BUFFER].into_boxed_slice());
}

/// Outgoing bytes gathered before `poll_ready` writes them out: a batch of
/// small frames goes in one write.
const WRITE_BATCH: usize = 16 * 1024;

/// Why reading or writing a socket failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame the protocol does not allow (reserved bits, an unmasked or
    /// fragmented control frame, an unknown opcode, a stray continuation).
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason that is not UTF-8.
    #[error("invalid UTF-8 in a text message")]
    Utf8,
    /// A message larger than the limit; refused at its frame's header.
    #[error("message too big: over {limit} bytes")]
    TooBig { limit: usize },
    /// The connection ended without a closing handshake.
    #[error("connection ended without a closing handshake")]
    Reset,
    /// A message sent after the close frame.
    #[error("socket already closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The upgrade request of a WebSocket (`GET` with `Upgrade: websocket`,
/// HTTP/1.1): its key and offered subprotocols.
pub struct Upgrade {
    key: HeaderValue,
    protocols: Vec<HeaderValue>,
    on_upgrade: OnUpgrade,
}

/// A request that is not a WebSocket upgrade.
#[derive(Debug)]
pub struct NotUpgrade(StatusCode, &'static str);

impl IntoResponse for NotUpgrade {
    fn into_response(self) -> Response {
        let NotUpgrade(status, reason) = self;
        if status == StatusCode::UPGRADE_REQUIRED {
            return (status, [(header::SEC_WEBSOCKET_VERSION, "13")], reason).into_response();
        }
        (status, reason).into_response()
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        if parts.method != Method::GET || parts.version != Version::HTTP_11 {
            return Err(NotUpgrade(
                StatusCode::BAD_REQUEST,
                "a WebSocket opens with an HTTP/1.1 GET upgrade",
            ));
        }
        if !header_has_token(headers, header::CONNECTION, "upgrade")
            || !header_has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(NotUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket upgrade required",
            ));
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(NotUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported WebSocket version: use 13",
            ));
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(NotUpgrade(
                StatusCode::BAD_REQUEST,
                "missing Sec-WebSocket-Key",
            ));
        };
        let protocols = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|p| HeaderValue::from_str(p.trim()).ok())
            .collect();
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(NotUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded",
            ));
        };
        Ok(Upgrade {
            key,
            protocols,
            on_upgrade,
        })
    }
}

impl Upgrade {
    /// Answers 101 Switching Protocols (with `protocol` if the client offered
    /// it) and hands the socket to `serve` once the connection is upgraded.
    pub fn on_upgrade<F>(
        self,
        protocol: &'static str,
        limit: usize,
        read_chunk: usize,
        serve: F,
    ) -> Response
    where
        F: FnOnce(WebSocket<TokioIo<Upgraded>>) + Send + 'static,
    {
        let offered = self.protocols.iter().any(|p| p == protocol);
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => serve(WebSocket::new(TokioIo::new(upgraded), limit, read_chunk)),
                Err(err) => tracing::debug!(%err, "WebSocket upgrade failed"),
            }
        });
        let mut response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, "upgrade"),
                (header::UPGRADE, "websocket"),
            ],
        )
            .into_response();
        let headers = response.headers_mut();
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if offered {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}

/// A fragmented message being received.
struct Fragments {
    text: bool,
    data: Vec<u8>,
}

/// A server's WebSocket over `io`.
pub struct WebSocket<T> {
    io: T,
    /// Bytes read and not yet parsed, from `parsed` on; empty (no
    /// allocation) when everything read was parsed.
    input: Vec<u8>,
    parsed: usize,
    /// A fragmented message's frames so far (boxed: rare).
    fragments: Option<Box<Fragments>>,
    /// Frames queued and not yet written; empty (no allocation) once written.
    output: Vec<u8>,
    /// Largest message (and frame) accepted.
    limit: usize,
    /// Most bytes read from the connection at once.
    read_chunk: usize,
    /// The client's close frame arrived: nothing more is read.
    close_received: bool,
    /// Our close frame is queued: nothing more is sent.
    close_sent: bool,
    /// Reading ended (an error, the close, the end of the stream).
    read_ended: bool,
}

impl<T> WebSocket<T> {
    /// A socket accepting messages up to `limit` bytes, reading at most
    /// `read_chunk` bytes at once (up to the thread's buffer).
    pub fn new(io: T, limit: usize, read_chunk: usize) -> Self {
        WebSocket {
            io,
            input: Vec::new(),
            parsed: 0,
            fragments: None,
            output: Vec::new(),
            limit,
            read_chunk: read_chunk.clamp(1, THREAD_READ_BUFFER),
            close_received: false,
            close_sent: false,
            read_ended: false,
        }
    }

    /// Appends a frame (unmasked, as a server's are) to the output.
    fn queue(&mut self, opcode: OpCode, payload: &[u8]) {
        let header = FrameHeader {
            is_final: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask: None,
        };
        let length = payload.len() as u64;
        self.output.reserve(header.len(length) + payload.len());
        // Writing into a vector cannot fail.
        let _ = header.format(length, &mut self.output);
        self.output.extend_from_slice(payload);
    }

    /// The next complete frame from the input, as a message if it completes
    /// one; `Ok(None)` when more bytes are needed.
    fn next_message(&mut self) -> Result<Option<Message>, Error> {
        loop {
            let unparsed = &self.input[self.parsed..];
            let mut cursor = Cursor::new(unparsed);
            let (header, length) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(None),
                Err(_) => return Err(Error::Protocol("unknown opcode")),
            };
            self.check(&header, length)?;
            // `check` bounded the length by the limit.
            let length = usize::try_from(length).unwrap_or(usize::MAX);
            let start = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
            let Some(payload) = unparsed.get(start..).and_then(|rest| rest.get(..length)) else {
                return Ok(None);
            };
            let mut payload = payload.to_vec();
            if let Some(mask) = header.mask {
                for (i, byte) in payload.iter_mut().enumerate() {
                    *byte ^= mask[i & 3];
                }
            }
            self.parsed += start + length;
            if self.parsed == self.input.len() {
                // Everything read is parsed: release the buffer.
                self.input = Vec::new();
                self.parsed = 0;
            }
            if let Some(message) = self.on_frame(&header, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// The rules a frame's header must meet, checked before its payload is
    /// waited for.
    fn check(&self, header: &FrameHeader, length: u64) -> Result<(), Error> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(Error::Protocol("reserved bits set"));
        }
        if header.mask.is_none() {
            return Err(Error::Protocol("unmasked client frame"));
        }
        if let OpCode::Control(_) = header.opcode {
            if !header.is_final {
                return Err(Error::Protocol("fragmented control frame"));
            }
            if length > 125 {
                return Err(Error::Protocol("control frame over 125 bytes"));
            }
        }
        let so_far = self.fragments.as_ref().map_or(0, |f| f.data.len()) as u64;
        if length.saturating_add(so_far) > self.limit as u64 {
            return Err(Error::TooBig { limit: self.limit });
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        header: &FrameHeader,
        payload: Vec<u8>,
    ) -> Result<Option<Message>, Error> {
        match header.opcode {
            OpCode::Control(Control::Ping) => {
                if !self.close_sent {
                    self.queue(OpCode::Control(Control::Pong), &payload);
                }
                Ok(Some(Message::Ping(Bytes::from(payload))))
            }
            OpCode::Control(Control::Pong) => Ok(Some(Message::Pong(Bytes::from(payload)))),
            OpCode::Control(Control::Close) => self.on_close(payload).map(Some),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(Error::Protocol("unknown opcode"))
            }
            OpCode::Data(Data::Continue) => {
                let Some(mut fragments) = self.fragments.take() else {
                    return Err(Error::Protocol("continuation frame without a message"));
                };
                fragments.data.extend_from_slice(&payload);
                if !header.is_final {
                    self.fragments = Some(fragments);
                    return Ok(None);
                }
                let Fragments { text, data } = *fragments;
                message(text, data).map(Some)
            }
            OpCode::Data(data) => {
                if self.fragments.is_some() {
                    return Err(Error::Protocol("new message before the last one ended"));
                }
                let text = data == Data::Text;
                if header.is_final {
                    return message(text, payload).map(Some);
                }
                self.fragments = Some(Box::new(Fragments {
                    text,
                    data: payload,
                }));
                Ok(None)
            }
        }
    }

    /// The client's close frame: answered with ours (its code echoed) unless
    /// ours was sent first.
    fn on_close(&mut self, payload: Vec<u8>) -> Result<Message, Error> {
        let frame = match payload.len() {
            0 => None,
            1 => return Err(Error::Protocol("close frame of one byte")),
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                if !CloseCode::from(code).is_allowed() {
                    return Err(Error::Protocol("close code not allowed"));
                }
                let reason = String::from_utf8(payload[2..].to_vec()).map_err(|_| Error::Utf8)?;
                Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from(reason),
                })
            }
        };
        self.close_received = true;
        if !self.close_sent {
            self.close_sent = true;
            match &frame {
                Some(f) => self.queue(OpCode::Control(Control::Close), &f.code.to_be_bytes()),
                None => self.queue(OpCode::Control(Control::Close), &[]),
            }
        }
        Ok(Message::Close(frame))
    }
}

fn message(text: bool, data: Vec<u8>) -> Result<Message, Error> {
    if text {
        let text = String::from_utf8(data).map_err(|_| Error::Utf8)?;
        Ok(Message::Text(Utf8Bytes::from(text)))
    } else {
        Ok(Message::Binary(Bytes::from(data)))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> WebSocket<T> {
    /// Writes the output out; releases it once written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.output.is_empty() {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.output))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if written == self.output.len() {
                self.output = Vec::new();
            } else {
                self.output.drain(..written);
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads what the connection has into the input; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        READ_BUFFER.with_borrow_mut(|buffer| {
            let mut read = ReadBuf::new(&mut buffer[..self.read_chunk]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
            let got = read.filled();
            if self.parsed > 0 {
                self.input.drain(..self.parsed);
                self.parsed = 0;
            }
            self.input.extend_from_slice(got);
            Poll::Ready(Ok(got.len()))
        })
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Stream for WebSocket<T> {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Pongs and a close reply go out as soon as the connection takes
        // them; a full connection only delays them.
        if let Poll::Ready(Err(err)) = this.poll_write_out(cx) {
            this.read_ended = true;
            return Poll::Ready(Some(Err(Error::Io(err))));
        }
        if this.read_ended || this.close_received {
            return Poll::Ready(None);
        }
        loop {
            match this.next_message() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(err) => {
                    this.read_ended = true;
                    return Poll::Ready(Some(Err(err)));
                }
            }
            match ready!(this.poll_fill(cx)) {
                Ok(0) => {
                    this.read_ended = true;
                    return Poll::Ready(Some(Err(Error::Reset)));
                }
                Ok(_) => {}
                Err(err) => {
                    this.read_ended = true;
                    return Poll::Ready(Some(Err(Error::Io(err))));
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WebSocket<T> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.output.len() >= WRITE_BATCH {
            ready!(this.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Error> {
        let this = self.get_mut();
        if this.close_sent {
            return Err(Error::Closed);
        }
        match message {
            Message::Text(text) => this.queue(OpCode::Data(Data::Text), text.as_bytes()),
            Message::Binary(data) => this.queue(OpCode::Data(Data::Binary), &data),
            Message::Ping(data) => this.queue(OpCode::Control(Control::Ping), &data),
            Message::Pong(data) => this.queue(OpCode::Control(Control::Pong), &data),
            Message::Close(frame) => {
                this.close_sent = true;
                let mut payload = Vec::new();
                if let Some(CloseFrame { code, reason }) = frame {
                    payload.extend_from_slice(&code.to_be_bytes());
                    // A control frame's payload is at most 125 bytes.
                    let mut end = reason.len().min(123);
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    payload.extend_from_slice(&reason.as_bytes()[..end]);
                }
                this.queue(OpCode::Control(Control::Close), &payload);
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
#[path = "ws_tests.rs"]
mod tests;
