//! The gateway served as the binaries serve it (runtime's guarded listener),
//! on loopback: header-read timeout, connection cap with health still
//! answering, sockets per address and per user, X-Forwarded-For only from
//! trusted proxies, and CHECK_ORIGIN. Every wait is bounded.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quckchat_gateway::{Gateway, GatewayConfig};
use quckchat_runtime::admin::{self, BusHealth, Health};
use quckchat_runtime::auth::mint_token;
use quckchat_runtime::bus::{Bus, MemoryBus};
use quckchat_runtime::config::ConfigReader;
use quckchat_runtime::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const BOUND: Duration = Duration::from_secs(5);

struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(vars: &[(&'static str, &'static str)]) -> Server {
    let mut env: HashMap<&str, &str> = HashMap::from([("JWT_SECRET", "k")]);
    env.extend(vars.iter().copied());
    let config = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap();
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let stop = CancellationToken::new();
    let health = Health::new("test", vec![Arc::new(BusHealth(bus.clone()))]);
    let gateway = Gateway::new(config.clone(), bus, stop.clone());
    let router = gateway.router().merge(admin::router(health.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve_with_health_limited(
        listener,
        router,
        stop.clone(),
        health,
        config.connections,
        std::future::ready(()),
    ));
    Server { addr, stop }
}

/// Sends a request; the status code and the open connection.
async fn request(addr: SocketAddr, head: &str) -> (u16, String, TcpStream) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(BOUND, async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a response");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no response in time");
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text[9..12].parse().unwrap();
    (status, text, tcp)
}

/// A WebSocket upgrade as `user`, with extra header lines.
async fn upgrade(addr: SocketAddr, user: &str, extra: &str) -> (u16, TcpStream) {
    let token = mint_token("k", user, Duration::from_secs(600));
    let head = format!(
        "GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: localhost\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    let (status, _, tcp) = request(addr, &head).await;
    (status, tcp)
}

async fn ready(addr: SocketAddr) -> u16 {
    request(addr, "GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .0
}

/// Waits for the server to close `tcp`; false if it stays open past `bound`.
async fn closed_within(tcp: &mut TcpStream, bound: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(bound, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Retries `upgrade` until it gives `want` (a closed socket's places are
/// freed as its task ends).
async fn eventually(addr: SocketAddr, user: &str, extra: &str, want: u16) -> TcpStream {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let (status, tcp) = upgrade(addr, user, extra).await;
        if status == want {
            return tcp;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_connection_sending_one_byte_is_closed_by_the_header_timeout() {
    let s = start(&[("HEADER_READ_TIMEOUT_SECS", "1")]).await;
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"G").await.unwrap();
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(4)).await);
    assert!(closed_within(&mut idle, Duration::from_secs(1)).await);
    // An upgraded socket is not cut by it.
    let (status, mut ws) = upgrade(s.addr, "alice", "").await;
    assert_eq!(status, 101);
    assert!(!closed_within(&mut ws, Duration::from_millis(1500)).await);
}

#[tokio::test]
async fn past_max_connections_sockets_are_refused_and_health_answers() {
    let s = start(&[("MAX_CONNECTIONS", "3")]).await;
    let mut held = Vec::new();
    for user in ["u1", "u2", "u3"] {
        let (status, tcp) = upgrade(s.addr, user, "").await;
        assert_eq!(status, 101);
        held.push(tcp);
    }
    let (status, _) = upgrade(s.addr, "u4", "").await;
    assert_eq!(status, 503);
    assert_eq!(ready(s.addr).await, 200);
    // A freed place admits again.
    drop(held.pop());
    eventually(s.addr, "u4", "", 101).await;
}

#[tokio::test]
async fn sockets_per_address_are_capped() {
    let s = start(&[("MAX_CONNECTIONS_PER_IP", "2")]).await;
    let (a, _a) = upgrade(s.addr, "u1", "").await;
    let (b, b_tcp) = upgrade(s.addr, "u2", "").await;
    let (c, _) = upgrade(s.addr, "u3", "").await;
    assert_eq!((a, b, c), (101, 101, 429));
    assert_eq!(ready(s.addr).await, 200);
    drop(b_tcp);
    eventually(s.addr, "u3", "", 101).await;
}

#[tokio::test]
async fn sockets_per_user_are_capped() {
    let s = start(&[("MAX_SOCKETS_PER_USER", "2")]).await;
    let (a, _a) = upgrade(s.addr, "alice", "").await;
    let (b, b_tcp) = upgrade(s.addr, "alice", "").await;
    let (c, _) = upgrade(s.addr, "alice", "").await;
    assert_eq!((a, b, c), (101, 101, 429));
    let (bob, _bob) = upgrade(s.addr, "bob", "").await;
    assert_eq!(bob, 101);
    drop(b_tcp);
    eventually(s.addr, "alice", "", 101).await;
}

#[tokio::test]
async fn forwarded_for_is_ignored_from_an_untrusted_peer() {
    let s = start(&[("MAX_CONNECTIONS_PER_IP", "1")]).await;
    let (a, _a) = upgrade(s.addr, "u1", "X-Forwarded-For: 203.0.113.1\r\n").await;
    let (b, _) = upgrade(s.addr, "u2", "X-Forwarded-For: 203.0.113.2\r\n").await;
    assert_eq!((a, b), (101, 429));
}

#[tokio::test]
async fn forwarded_for_is_honoured_from_a_trusted_proxy() {
    let s = start(&[
        ("MAX_CONNECTIONS_PER_IP", "1"),
        ("TRUSTED_PROXIES", "127.0.0.0/8"),
    ])
    .await;
    let (a, _a) = upgrade(s.addr, "u1", "X-Forwarded-For: 203.0.113.1\r\n").await;
    let (b, _b) = upgrade(s.addr, "u2", "X-Forwarded-For: 203.0.113.2\r\n").await;
    // A spoofed left part does not escape: the right-most untrusted hop counts.
    let (c, _) = upgrade(
        s.addr,
        "u3",
        "X-Forwarded-For: 198.51.100.9, 203.0.113.1\r\n",
    )
    .await;
    assert_eq!((a, b, c), (101, 101, 429));
}

#[tokio::test]
async fn check_origin_refuses_other_sites() {
    let s = start(&[("CHECK_ORIGIN", "https://app.example.com,//*.example.org")]).await;
    let origin = |o: &str| format!("Origin: {o}\r\n");
    assert_eq!(
        upgrade(s.addr, "u", &origin("https://evil.example.com"))
            .await
            .0,
        403
    );
    assert_eq!(upgrade(s.addr, "u", &origin("null")).await.0, 403);
    assert_eq!(
        upgrade(s.addr, "u", &origin("https://app.example.com"))
            .await
            .0,
        101
    );
    assert_eq!(
        upgrade(s.addr, "u", &origin("http://chat.example.org"))
            .await
            .0,
        101
    );
    assert_eq!(upgrade(s.addr, "u", "").await.0, 101);
}

#[tokio::test]
async fn check_origin_defaults_to_host_and_can_be_turned_off() {
    let s = start(&[("HOST", "chat.example.com")]).await;
    let origin = |o: &str| format!("Origin: {o}\r\n");
    assert_eq!(
        upgrade(s.addr, "u", &origin("https://evil.example.com"))
            .await
            .0,
        403
    );
    assert_eq!(upgrade(s.addr, "u", &origin("null")).await.0, 403);
    assert_eq!(
        upgrade(s.addr, "u", &origin("https://chat.example.com:8443"))
            .await
            .0,
        101
    );
    assert_eq!(upgrade(s.addr, "u", "").await.0, 101);

    let off = start(&[("CHECK_ORIGIN", "false")]).await;
    assert_eq!(
        upgrade(off.addr, "u", &origin("https://evil.example.com"))
            .await
            .0,
        101
    );
    assert_eq!(upgrade(off.addr, "u", &origin("null")).await.0, 101);
}
