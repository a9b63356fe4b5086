//! The transport against frames written by hand on an in-memory connection.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::{Error, WebSocket};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUE: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const LIMIT: usize = 1024;

/// A client frame: masked unless `masked` is false.
fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![u8::from(fin) << 7 | rsv << 4 | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn text(payload: &str) -> Vec<u8> {
    frame(true, 0, TEXT, payload.as_bytes(), true)
}

fn pair(read_chunk: usize) -> (WebSocket<DuplexStream>, DuplexStream) {
    let (server, client) = tokio::io::duplex(256 * 1024);
    (WebSocket::new(server, LIMIT, read_chunk), client)
}

async fn next(ws: &mut WebSocket<DuplexStream>) -> Option<Result<Message, Error>> {
    tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the socket answered")
}

/// The next frame the server wrote: (first byte, payload). Server frames are
/// unmasked.
async fn server_frame(client: &mut DuplexStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await.expect("a frame header");
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            client.read_exact(&mut n).await.expect("length");
            usize::from(u16::from_be_bytes(n))
        }
        127 => {
            let mut n = [0u8; 8];
            client.read_exact(&mut n).await.expect("length");
            usize::try_from(u64::from_be_bytes(n)).expect("length")
        }
        n => usize::from(n),
    };
    let mut payload = vec![0; len];
    client.read_exact(&mut payload).await.expect("payload");
    (head[0], payload)
}

#[tokio::test]
async fn messages_are_read_whole_and_nothing_is_kept_once_parsed() {
    let (mut ws, mut client) = pair(64 * 1024);
    // Two frames in one write, then a binary one.
    let mut bytes = text("[null,\"1\",\"phoenix\",\"heartbeat\",{}]");
    bytes.extend(text("second"));
    client.write_all(&bytes).await.unwrap();
    let Some(Ok(Message::Text(first))) = next(&mut ws).await else {
        panic!("a text message")
    };
    assert_eq!(first.as_str(), "[null,\"1\",\"phoenix\",\"heartbeat\",{}]");
    // The second frame was read with the first and waits in the input.
    assert!(!ws.input.is_empty());
    let Some(Ok(Message::Text(second))) = next(&mut ws).await else {
        panic!("a text message")
    };
    assert_eq!(second.as_str(), "second");
    assert_eq!(ws.input.capacity(), 0, "no input kept once parsed");
    client
        .write_all(&frame(true, 0, BINARY, &[0, 1, 2], true))
        .await
        .unwrap();
    let Some(Ok(Message::Binary(data))) = next(&mut ws).await else {
        panic!("a binary message")
    };
    assert_eq!(&data[..], &[0, 1, 2]);
}

#[tokio::test]
async fn frames_split_across_reads_are_put_together() {
    // Three bytes a read: every header and payload arrives in pieces.
    let (mut ws, mut client) = pair(3);
    let long = "x".repeat(300);
    let mut bytes = text(&long);
    bytes.extend(text("short"));
    client.write_all(&bytes).await.unwrap();
    let Some(Ok(Message::Text(first))) = next(&mut ws).await else {
        panic!("a text message")
    };
    assert_eq!(first.as_str(), long);
    let Some(Ok(Message::Text(second))) = next(&mut ws).await else {
        panic!("a text message")
    };
    assert_eq!(second.as_str(), "short");
    assert_eq!(ws.input.capacity(), 0);
}

#[tokio::test]
async fn fragments_make_one_message_and_a_ping_between_them_is_answered() {
    let (mut ws, mut client) = pair(64 * 1024);
    let mut bytes = frame(false, 0, TEXT, "héllo, ".as_bytes(), true);
    bytes.extend(frame(true, 0, PING, b"p1", true));
    bytes.extend(frame(false, 0, CONTINUE, "wor".as_bytes(), true));
    bytes.extend(frame(true, 0, CONTINUE, "ld".as_bytes(), true));
    client.write_all(&bytes).await.unwrap();
    let Some(Ok(Message::Ping(ping))) = next(&mut ws).await else {
        panic!("the ping")
    };
    assert_eq!(&ping[..], b"p1");
    let Some(Ok(Message::Text(whole))) = next(&mut ws).await else {
        panic!("the message")
    };
    assert_eq!(whole.as_str(), "héllo, world");
    assert_eq!(
        server_frame(&mut client).await,
        (0x80 | PONG, b"p1".to_vec())
    );
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_at_its_header() {
    let (mut ws, mut client) = pair(64 * 1024);
    // Only the header: the payload is never waited for.
    let header = &frame(true, 0, TEXT, &vec![b'a'; LIMIT + 1], true)[..8];
    client.write_all(header).await.unwrap();
    assert!(matches!(
        next(&mut ws).await,
        Some(Err(Error::TooBig { limit: LIMIT }))
    ));
    // Fragments count together.
    let (mut ws, mut client) = pair(64 * 1024);
    let mut bytes = frame(false, 0, TEXT, &vec![b'a'; LIMIT], true);
    bytes.extend(frame(true, 0, CONTINUE, b"a", true));
    client.write_all(&bytes).await.unwrap();
    assert!(matches!(
        next(&mut ws).await,
        Some(Err(Error::TooBig { .. }))
    ));
    // Reading ends after an error.
    assert!(next(&mut ws).await.is_none());
}

#[tokio::test]
async fn frames_the_protocol_forbids_are_protocol_errors() {
    let cases = [
        ("reserved bits", frame(true, 0b100, TEXT, b"a", true)),
        ("unmasked", frame(true, 0, TEXT, b"a", false)),
        ("fragmented control", frame(false, 0, PING, b"a", true)),
        ("long control", frame(true, 0, PING, &[0; 126], true)),
        ("unknown data opcode", frame(true, 0, 0x3, b"a", true)),
        ("unknown control opcode", frame(true, 0, 0xB, b"", true)),
        ("stray continuation", frame(true, 0, CONTINUE, b"a", true)),
        ("one-byte close", frame(true, 0, CLOSE, &[3], true)),
        (
            "close 1005",
            frame(true, 0, CLOSE, &1005u16.to_be_bytes(), true),
        ),
        ("message inside a message", {
            let mut b = frame(false, 0, TEXT, b"a", true);
            b.extend(frame(true, 0, TEXT, b"b", true));
            b
        }),
    ];
    for (name, bytes) in cases {
        let (mut ws, mut client) = pair(64 * 1024);
        client.write_all(&bytes).await.unwrap();
        let got = next(&mut ws).await;
        assert!(
            matches!(got, Some(Err(Error::Protocol(_)))),
            "{name}: {got:?}"
        );
    }
}

#[tokio::test]
async fn text_that_is_not_utf8_is_refused() {
    for bytes in [
        frame(true, 0, TEXT, &[0xff, 0xfe], true),
        // Split inside a character: valid only put together, and not here.
        {
            let mut b = frame(false, 0, TEXT, &[0xc3], true);
            b.extend(frame(true, 0, CONTINUE, &[0x28], true));
            b
        },
        frame(true, 0, CLOSE, &[0x03, 0xe8, 0xff], true),
    ] {
        let (mut ws, mut client) = pair(64 * 1024);
        client.write_all(&bytes).await.unwrap();
        assert!(matches!(next(&mut ws).await, Some(Err(Error::Utf8))));
    }
    // A character split across fragments is fine.
    let (mut ws, mut client) = pair(64 * 1024);
    let mut b = frame(false, 0, TEXT, &[0xc3], true);
    b.extend(frame(true, 0, CONTINUE, &[0xa9], true));
    client.write_all(&b).await.unwrap();
    let Some(Ok(Message::Text(t))) = next(&mut ws).await else {
        panic!("a text message")
    };
    assert_eq!(t.as_str(), "é");
}

#[tokio::test]
async fn the_clients_close_is_echoed_and_ends_reading() {
    let (mut ws, mut client) = pair(64 * 1024);
    let mut payload = 1001u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"going away");
    client
        .write_all(&frame(true, 0, CLOSE, &payload, true))
        .await
        .unwrap();
    let Some(Ok(Message::Close(Some(close)))) = next(&mut ws).await else {
        panic!("the close")
    };
    assert_eq!(close.code, 1001);
    assert_eq!(close.reason.as_str(), "going away");
    assert!(next(&mut ws).await.is_none());
    // Sending after the close is refused; closing writes our close.
    assert!(matches!(
        ws.send(Message::Text("late".into())).await,
        Err(Error::Closed)
    ));
    ws.close().await.unwrap();
    assert_eq!(
        server_frame(&mut client).await,
        (0x80 | CLOSE, 1001u16.to_be_bytes().to_vec())
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "one close frame, then the end");
}

#[tokio::test]
async fn our_close_is_not_sent_twice() {
    let (mut ws, mut client) = pair(64 * 1024);
    ws.send(Message::Close(Some(CloseFrame {
        code: 1013,
        reason: "slow consumer".into(),
    })))
    .await
    .unwrap();
    let (head, payload) = server_frame(&mut client).await;
    assert_eq!(head, 0x80 | CLOSE);
    assert_eq!(&payload[..2], &1013u16.to_be_bytes());
    assert_eq!(&payload[2..], b"slow consumer");
    // The client answers; nothing more is written.
    client
        .write_all(&frame(true, 0, CLOSE, &1013u16.to_be_bytes(), true))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut ws).await,
        Some(Ok(Message::Close(Some(_))))
    ));
    ws.close().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn frames_are_written_with_their_lengths_and_nothing_is_kept_once_written() {
    let (mut ws, mut client) = pair(64 * 1024);
    for len in [0, 125, 126, 65_535, 65_536, 70_000] {
        let body = "y".repeat(len);
        ws.send(Message::Text(body.clone().into())).await.unwrap();
        assert_eq!(ws.output.capacity(), 0, "no output kept once written");
        assert_eq!(
            server_frame(&mut client).await,
            (0x80 | TEXT, body.into_bytes()),
            "{len} bytes"
        );
    }
    // Fed frames go out together on the flush.
    ws.feed(Message::Text("a".into())).await.unwrap();
    ws.feed(Message::Binary(vec![1, 2].into())).await.unwrap();
    ws.flush().await.unwrap();
    assert_eq!(
        server_frame(&mut client).await,
        (0x80 | TEXT, b"a".to_vec())
    );
    assert_eq!(server_frame(&mut client).await, (0x80 | BINARY, vec![1, 2]));
}

#[tokio::test]
async fn a_connection_that_ends_without_a_close_is_a_reset() {
    let (mut ws, mut client) = pair(64 * 1024);
    // Half a frame, then the end.
    client.write_all(&text("hello")[..4]).await.unwrap();
    drop(client);
    assert!(matches!(next(&mut ws).await, Some(Err(Error::Reset))));
    assert!(next(&mut ws).await.is_none());
}
