//! WebSocket protocol errors over a real socket, frames written by hand: a
//! frame the gateway refuses (reserved bits, a fragmented control frame, an
//! unmasked client frame) is answered with a 1002 close, a text frame that is
//! not UTF-8 with 1007, and a ping flood with 1008 — never an empty close;
//! and the upgrade itself: the accept key, the `phoenix` subprotocol, and
//! 426/400 for what is not a WebSocket upgrade.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::collections::HashMap;
use std::time::Duration;

use quckchat::ServeConfig;
use quckchat_runtime::auth::mint_token;
use quckchat_runtime::config::ConfigReader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "ws-protocol-test-secret";
const TEXT: u8 = 0x1;
const PING: u8 = 0x9;
const CLOSE: u8 = 0x8;
const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

async fn start(data_dir: &std::path::Path) -> std::net::SocketAddr {
    let dir = data_dir.to_str().unwrap();
    let env: HashMap<&str, &str> = HashMap::from([
        ("JWT_SECRET", SECRET),
        ("DATA_DIR", dir),
        ("SHUTDOWN_DRAIN_SECS", "1"),
    ]);
    let config = ServeConfig::read(&mut ConfigReader::new(&env)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(quckchat::run(config, listener, std::future::pending()));
    addr
}

/// The RFC 6455 example key and the accept value it calls for.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n";

/// Sends an upgrade request with these header lines (besides `Host`) and
/// returns the connection and the response's head.
async fn request(addr: std::net::SocketAddr, headers: &str) -> (TcpStream, String) {
    let token = mint_token(SECRET, "alice", Duration::from_secs(60));
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "connection closed during the handshake");
        head.push(byte[0]);
    }
    (tcp, String::from_utf8(head).unwrap())
}

/// An upgraded connection, the handshake done by hand.
async fn open(addr: std::net::SocketAddr) -> TcpStream {
    let headers = format!("{UPGRADE}Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n");
    let (tcp, head) = request(addr, &headers).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// One frame (payload under 126 bytes); `rsv` goes in bits 4-6 of the
/// first byte.
fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let len = u8::try_from(payload.len()).unwrap();
    if masked {
        out.push(0x80 | len);
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.push(len);
        out.extend_from_slice(payload);
    }
    out
}

/// Reads server frames until a close; its code, or `None` when the
/// connection ends without one.
async fn close_code(tcp: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Parse what is buffered.
        while buf.len() >= 2 {
            let opcode = buf[0] & 0x0f;
            let (len, start) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                126 => break,
                127 => panic!("unexpectedly large server frame"),
                n => (usize::from(n), 2),
            };
            if buf.len() < start + len {
                break;
            }
            if opcode == CLOSE {
                assert!(len >= 2, "an empty close frame");
                return Some(u16::from_be_bytes([buf[start], buf[start + 1]]));
            }
            buf.drain(..start + len);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no close frame within 10 s"),
        }
    }
}

async fn code_after(addr: std::net::SocketAddr, bytes: &[u8]) -> Option<u16> {
    let mut tcp = open(addr).await;
    tcp.write_all(bytes).await.unwrap();
    close_code(&mut tcp).await
}

#[tokio::test]
async fn protocol_errors_close_with_1002_invalid_utf8_with_1007_and_ping_floods_with_1008() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let heartbeat = br#"[null,"1","phoenix","heartbeat",{}]"#;

    // A well-formed frame first, so the socket is known to work.
    let mut tcp = open(addr).await;
    tcp.write_all(&frame(true, 0, TEXT, heartbeat, true))
        .await
        .unwrap();
    let mut reply = [0u8; 2];
    tcp.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[0] & 0x0f, TEXT, "the heartbeat is answered");
    drop(tcp);

    assert_eq!(
        code_after(addr, &frame(true, 0b100, TEXT, heartbeat, true)).await,
        Some(1002),
        "a reserved bit set"
    );
    assert_eq!(
        code_after(addr, &frame(false, 0, PING, b"x", true)).await,
        Some(1002),
        "a fragmented control frame"
    );
    assert_eq!(
        code_after(addr, &frame(true, 0, TEXT, heartbeat, false)).await,
        Some(1002),
        "an unmasked client frame"
    );
    assert_eq!(
        code_after(
            addr,
            &frame(true, 0, TEXT, b"[null,\"1\",\"\xff\xfe\"]", true)
        )
        .await,
        Some(1007),
        "a text frame that is not UTF-8"
    );
    let flood: Vec<u8> = (0..5_000)
        .flat_map(|_| frame(true, 0, PING, b"p", true))
        .collect();
    assert_eq!(code_after(addr, &flood).await, Some(1008), "a ping flood");
}

#[tokio::test]
async fn the_upgrade_answers_the_key_picks_phoenix_and_refuses_what_is_not_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let key = format!("Sec-WebSocket-Key: {KEY}\r\n");
    let v13 = "Sec-WebSocket-Version: 13\r\n";

    let (_, raw) = request(
        addr,
        &format!("{UPGRADE}{key}{v13}Sec-WebSocket-Protocol: chat, phoenix\r\n"),
    )
    .await;
    // Header names in any case; the accept value (base64) as sent.
    let head = raw.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{raw}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}\r\n",
            ACCEPT.to_ascii_lowercase()
        )) && raw.contains(ACCEPT),
        "{raw}"
    );
    assert!(
        head.contains("sec-websocket-protocol: phoenix\r\n"),
        "{head}"
    );
    // Not offered: not chosen.
    let (_, raw) = request(addr, &format!("{UPGRADE}{key}{v13}")).await;
    let head = raw.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-protocol"), "{head}");

    // No upgrade asked for, or another version: 426 naming the version.
    for headers in [
        format!("{key}{v13}"),
        format!("{UPGRADE}{key}Sec-WebSocket-Version: 8\r\n"),
    ] {
        let (_, raw) = request(addr, &headers).await;
        let head = raw.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 426"), "{headers}: {head}");
        assert!(head.contains("sec-websocket-version: 13"), "{head}");
    }
    // No key: 400.
    let (_, raw) = request(addr, &format!("{UPGRADE}{v13}")).await;
    let head = raw.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 400"), "{head}");
}
