//! The built `quckchat` binary, run as operators run it: its start-up log
//! names the configuration it used with secrets masked, `RUST_LOG` filters
//! that log, and its admin endpoints report real state (health fields,
//! metrics that move with activity).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use quckchat_runtime::auth::mint_token;
use quckchat_runtime::testkit;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const JWT: &str = "jwt-secret-value-0451";
const SKB: &str = "secret-key-base-value-0451";
const GRPC_TOKEN: &str = "binary-test-grpc-token-5f1e2d";
/// Starting a binary on a loaded 2-core machine can be slow; this only
/// bounds a failure.
const START: Duration = Duration::from_secs(60);
const PROMPTLY: Duration = Duration::from_secs(10);

/// A running `quckchat` and its log lines (ANSI colours removed).
struct Server {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    _data: tempfile::TempDir,
}

fn spawn(env: &[(&str, &str)]) -> Server {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quckchat"));
    cmd.env_clear()
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0")
        .env("DATA_DIR", data.path())
        .env("SHUTDOWN_DRAIN_SECS", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if tx.send(testkit::strip_ansi(&line)).is_err() {
                return;
            }
        }
    });
    Server {
        child,
        lines,
        seen: Vec::new(),
        _data: data,
    }
}

impl Server {
    /// Waits for a log line containing `needle`; fails past `within` or if
    /// the process ends first.
    async fn wait_for_line(&mut self, needle: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                other => panic!(
                    "no log line with {needle:?} ({other:?}); seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits until it listens; returns its address.
    async fn listening(&mut self) -> std::net::SocketAddr {
        let line = self.wait_for_line("quckchat listening", START).await;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no addr in {line:?}"));
        addr.parse().unwrap()
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// A plain HTTP/1.1 GET: status and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PROMPTLY, tcp.read_to_end(&mut raw))
        .await
        .expect("HTTP answer")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The value of the sample `series` (name with its labels, exactly as
/// rendered) in Prometheus text, if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .map(|v| v.trim().parse().unwrap())
    })
}

/// Polls `/metrics` until `series` has `value` (metrics are updated by the
/// socket's task, just after the client sees the effect).
async fn wait_metric(addr: std::net::SocketAddr, series: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let (_, body) = get(addr, "/metrics").await;
        if sample(&body, series) == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never became {value}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn recv(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(PROMPTLY, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn startup_log_lists_the_configuration_with_secrets_masked() {
    let mut server = spawn(&[
        ("RUST_LOG", "info"),
        ("JWT_SECRET", JWT),
        ("SECRET_KEY_BASE", SKB),
        ("HOST", "chat.example.test"),
        ("NODE_NAME", "qc-binary-test"),
        ("REQUEST_TIMEOUT_MS", "1234"),
        ("SOCKET_OUTBOUND_QUEUE", "77"),
        ("SOCKET_MAX_CHANNELS", "7"),
        ("SOCKET_WRITE_TIMEOUT_SECS", "9"),
        ("SOCKET_READ_BUFFER_BYTES", "4096"),
        ("GRPC_AUTH_TOKEN", GRPC_TOKEN),
    ]);
    server.listening().await;
    let config = server
        .seen
        .iter()
        .find(|l| l.contains("configuration") && l.contains("config="))
        .unwrap_or_else(|| panic!("no configuration line in:\n{}", server.seen.join("\n")))
        .clone();
    let pairs: HashSet<&str> = config
        .split_whitespace()
        .map(|w| w.strip_prefix("config=").unwrap_or(w))
        .collect();
    for expected in [
        "PORT=0",
        "BIND_ADDRESS=127.0.0.1",
        "HOST=chat.example.test",
        "NODE_NAME=qc-binary-test",
        "JWT_SECRET=******",
        "SECRET_KEY_BASE=******",
        "REQUEST_TIMEOUT_MS=1234",
        "SOCKET_OUTBOUND_QUEUE=77",
        "SOCKET_MAX_CHANNELS=7",
        "SOCKET_WRITE_TIMEOUT_SECS=9",
        "SOCKET_READ_BUFFER_BYTES=4096",
        "SHUTDOWN_DRAIN_SECS=1",
        "GRPC_AUTH_TOKEN=******",
    ] {
        assert!(pairs.contains(expected), "{expected} not in {config}");
    }
    // Defaults are listed too.
    assert!(pairs.contains("SOCKET_IDLE_TIMEOUT_SECS=60"), "{config}");
    for line in &server.seen {
        assert!(!line.contains(JWT), "JWT_SECRET leaked: {line}");
        assert!(!line.contains(SKB), "SECRET_KEY_BASE leaked: {line}");
        assert!(!line.contains(GRPC_TOKEN), "GRPC_AUTH_TOKEN leaked: {line}");
    }
    assert!(
        !server.seen.iter().any(|l| l.contains("DEVELOPMENT secret")),
        "JWT_SECRET was set: no development-secret warning"
    );
    server.stop().await;
}

#[tokio::test]
async fn rust_log_filters_the_log() {
    // No JWT_SECRET: the development-secret warning follows the
    // configuration line, which RUST_LOG=warn must have filtered out.
    let mut server = spawn(&[("RUST_LOG", "warn")]);
    server.wait_for_line("DEVELOPMENT secret", START).await;
    assert!(
        !server
            .seen
            .iter()
            .any(|l| l.contains("configuration") || l.contains(" INFO ")),
        "info lines under RUST_LOG=warn:\n{}",
        server.seen.join("\n")
    );
    server.stop().await;
}

#[tokio::test]
async fn admin_endpoints_report_health_and_metrics_that_follow_activity() {
    let mut server = spawn(&[
        ("RUST_LOG", "info"),
        ("JWT_SECRET", JWT),
        ("NODE_NAME", "qc-admin-test"),
        // A read buffer far smaller than the frames below: it must grow.
        ("SOCKET_READ_BUFFER_BYTES", "64"),
    ]);
    let addr = server.listening().await;
    let version = env!("CARGO_PKG_VERSION");

    let (status, body) = get(addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        health,
        json!({"status": "ok", "node": "qc-admin-test", "version": version,
               "checks": {"bus": "ok", "store": "ok", "calls": "ok", "huddles": "ok", "devices": "ok"}})
    );
    let (status, body) = get(addr, "/health/ready").await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), health);
    let (status, body) = get(addr, "/health/live").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "ok"})
    );

    let (status, metrics) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &metrics,
            &format!("quckchat_build_info{{version=\"{version}\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
    let before = |series: &str| sample(&metrics, series).unwrap_or(0.0);
    assert_eq!(before("quckchat_gateway_connections"), 0.0);
    assert_eq!(before("quckchat_gateway_malformed_frames_total"), 0.0);
    assert_eq!(
        before("quckchat_gateway_joins_total{kind=\"chat\",result=\"refused\"}"),
        0.0
    );

    // One socket: a garbage frame, a join refused (no such conversation).
    let token = mint_token(JWT, "alice", Duration::from_secs(60));
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text("garbage".into())).await.unwrap();
    ws.send(Message::Text(
        json!(["1", "1", "chat:nosuch", "phx_join", {}])
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = recv(&mut ws).await;
    assert_eq!(reply[4]["status"], "error", "{reply}");
    let big = json!([null, "2", "phoenix", "heartbeat", {"pad": "x".repeat(20_000)}]);
    ws.send(Message::Text(big.to_string().into()))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut ws).await,
        json!([null, "2", "phoenix", "phx_reply", {"status": "ok", "response": {}}]),
        "a 20 KB frame through a 64-byte initial read buffer"
    );
    wait_metric(addr, "quckchat_gateway_connections", 1.0).await;
    wait_metric(addr, "quckchat_gateway_malformed_frames_total", 1.0).await;
    wait_metric(
        addr,
        "quckchat_gateway_joins_total{kind=\"chat\",result=\"refused\"}",
        1.0,
    )
    .await;
    ws.close(None).await.unwrap();
    wait_metric(addr, "quckchat_gateway_connections", 0.0).await;
    server.stop().await;
}
