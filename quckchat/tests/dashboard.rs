//! `/dev/dashboard` of the all-in-one server over real HTTP: on by default
//! for local requests, behind `DASHBOARD_TOKEN` when set, 404 when off; its
//! stats carry the figures the page draws and follow a client's activity,
//! without ids, secrets or message content.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use quckchat::ServeConfig;
use quckchat_runtime::auth::mint_token;
use quckchat_runtime::config::ConfigReader;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "dashboard-test-secret";
const GRPC_TOKEN: &str = "dashboard-grpc-token-0123456789";
const DASHBOARD_TOKEN: &str = "dashboard-token-abcdef0123456789";

struct Running {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn start(extra: &[(&str, &str)]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let mut env: HashMap<&str, &str> = HashMap::from([
        ("JWT_SECRET", SECRET),
        ("GRPC_AUTH_TOKEN", GRPC_TOKEN),
        ("DATA_DIR", data_dir.as_str()),
        ("SHUTDOWN_DRAIN_SECS", "1"),
    ]);
    env.extend(extra.iter().copied());
    let config = ServeConfig::read(&mut ConfigReader::new(&env)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(quckchat::run(config, listener, async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop,
        task,
        _dir: dir,
    }
}

struct HttpResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// A plain HTTP/1.1 GET with `headers`.
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("an HTTP answer")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    // Bodies here are small; chunked ones are taken apart.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

async fn stats(addr: SocketAddr) -> Value {
    let res = get(addr, "/dev/dashboard/stats", &[]).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert!(
        res.headers["content-type"].starts_with("application/json"),
        "{:?}",
        res.headers
    );
    serde_json::from_str(&res.body).unwrap()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, user: &str) -> Ws {
    let token = mint_token(SECRET, user, Duration::from_secs(60));
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}");
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The reply to `ref_`, skipping everything else.
async fn reply(ws: &mut Ws, ref_: &str) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap();
        if let Some(Ok(Message::Text(t))) = msg {
            let frame: Value = serde_json::from_str(t.as_str()).unwrap();
            if frame[3] == "phx_reply" && frame[1] == ref_ {
                return frame[4].clone();
            }
        }
    }
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

async fn put_conversation(addr: SocketAddr, id: &str, members: &str) {
    let args = [
        "conversation",
        "put",
        id,
        "--members",
        members,
        "--addr",
        &format!("http://{addr}"),
    ]
    .map(str::to_owned);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_quckchat"))
            .args(args)
            .env("GRPC_AUTH_TOKEN", GRPC_TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("a number, not {v}"))
}

fn event_count(stats: &Value, service: &str, event: &str) -> f64 {
    stats["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["service"] == service && e["event"] == event)
        .map(|e| num(&e["ok"]) + num(&e["failed"]))
        .sum()
}

#[tokio::test]
async fn local_requests_see_the_page_and_figures_that_follow_activity() {
    let server = start(&[]).await;
    let addr = server.addr;

    let page = get(addr, "/dev/dashboard", &[]).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers["cache-control"], "no-store");
    assert!(page.headers["content-security-policy"].contains("default-src 'none'"));
    for id in [
        "id=\"connections\"",
        "id=\"topics\"",
        "id=\"events-rate\"",
        "id=\"latency-p99\"",
    ] {
        assert!(page.body.contains(id), "{id} in the page");
    }
    for outside in ["src=", "<link", "url(", "@import"] {
        assert!(
            !page.body.contains(outside),
            "the page loads nothing from elsewhere: {outside}"
        );
    }

    let before = stats(addr).await;
    for key in [
        "node",
        "version",
        "status",
        "ready",
        "scope",
        "time_ms",
        "uptime_secs",
        "connections",
        "http_connections",
        "topics",
        "events",
        "joins",
        "pushes",
        "deliveries",
        "latency",
        "calls",
        "huddles",
        "checks",
        "bus",
        "store",
        "redis",
        "memory",
    ] {
        assert!(before.get(key).is_some(), "{key} in {before}");
    }
    assert_eq!(before["scope"], "all-in-one");
    for check in ["bus", "store", "calls", "huddles", "devices"] {
        assert_eq!(before["checks"][check], "ok", "{check}: {before}");
    }
    assert!(num(&before["memory"]["rss_bytes"]) > 0.0);
    assert!(num(&before["calls"]["in_progress"]) >= 0.0);
    assert!(num(&before["huddles"]["in_progress"]) >= 0.0);

    // A client connects, joins a conversation and sends.
    put_conversation(addr, "dash-c1", "dash-alice,dash-bob").await;
    let mut alice = connect(addr, "dash-alice").await;
    send(
        &mut alice,
        json!(["1", "1", "chat:dash-c1", "phx_join", {}]),
    )
    .await;
    assert_eq!(reply(&mut alice, "1").await["status"], "ok");
    let content = "the-secret-message-body";
    for i in 0..3 {
        let r = format!("m{i}");
        let text = json!({"type": "text", "content": content});
        send(
            &mut alice,
            json!(["1", r, "chat:dash-c1", "message:send", text]),
        )
        .await;
        assert_eq!(reply(&mut alice, &r).await["status"], "ok");
    }

    let after = stats(addr).await;
    assert!(
        num(&after["connections"]) >= num(&before["connections"]) + 1.0,
        "{before} → {after}"
    );
    assert!(num(&after["topics"]) >= num(&before["topics"]) + 1.0);
    assert!(
        event_count(&after, "chat", "message:send")
            >= event_count(&before, "chat", "message:send") + 3.0
    );
    assert!(
        event_count(&after, "chat", "phx_join") >= event_count(&before, "chat", "phx_join") + 1.0
    );
    assert!(
        num(&after["latency"]["push"]["count"]) >= num(&before["latency"]["push"]["count"]) + 3.0
    );
    assert!(num(&after["latency"]["all"]["p50"]) > 0.0);
    assert!(num(&after["latency"]["all"]["p99"]) >= num(&after["latency"]["all"]["p50"]));
    assert!(num(&after["pushes"]["chat"]["ok"]) >= 3.0);
    assert!(num(&after["store"]["calls"]) > num(&before["store"]["calls"]));
    assert!(num(&after["time_ms"]) >= num(&before["time_ms"]));

    // Counts only: no ids, secrets or content.
    let text = after.to_string();
    for secret in [
        "dash-alice",
        "dash-bob",
        "dash-c1",
        content,
        SECRET,
        GRPC_TOKEN,
    ] {
        assert!(!text.contains(secret), "{secret} in the stats: {text}");
    }

    // Leaving shows too.
    alice.close(None).await.unwrap();
    drop(alice);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = stats(addr).await;
        if num(&now["connections"]) < num(&after["connections"]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never went down: {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Through a proxy on this host, a request is not local.
    for header in ["X-Forwarded-For", "Forwarded", "X-Real-IP"] {
        let res = get(addr, "/dev/dashboard/stats", &[(header, "203.0.113.9")]).await;
        assert_eq!(res.status, 403, "{header}");
        assert!(res.body.contains("DASHBOARD_TOKEN"), "{}", res.body);
    }
    server.stop().await;
}

#[tokio::test]
async fn with_a_token_every_request_must_present_it() {
    let server = start(&[("DASHBOARD_TOKEN", DASHBOARD_TOKEN)]).await;
    let addr = server.addr;
    for path in ["/dev/dashboard", "/dev/dashboard/stats"] {
        let res = get(addr, path, &[]).await;
        assert_eq!(res.status, 401, "{path}: loopback is not enough");
        assert!(res.body.contains("DASHBOARD_TOKEN"), "{}", res.body);
        assert!(res.headers["www-authenticate"].starts_with("Bearer"));
        let wrong = get(
            addr,
            path,
            &[("Authorization", "Bearer dashboard-token-abcdef0123456788")],
        )
        .await;
        assert_eq!(wrong.status, 401, "{path}");
        let wrong = get(addr, &format!("{path}?token=nope-nope-nope-nope"), &[]).await;
        assert_eq!(wrong.status, 401, "{path}");

        let bearer = format!("Bearer {DASHBOARD_TOKEN}");
        let ok = get(addr, path, &[("Authorization", &bearer)]).await;
        assert_eq!(ok.status, 200, "{path}: {}", ok.body);
        let ok = get(addr, &format!("{path}?token={DASHBOARD_TOKEN}"), &[]).await;
        assert_eq!(ok.status, 200, "{path}: {}", ok.body);
        // A proxy in front is fine once the token is right.
        let ok = get(
            addr,
            path,
            &[
                ("Authorization", &bearer),
                ("X-Forwarded-For", "203.0.113.9"),
            ],
        )
        .await;
        assert_eq!(ok.status, 200, "{path}");
        assert!(
            !ok.body.contains(DASHBOARD_TOKEN),
            "the token is not echoed"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn disabled_answers_404() {
    let server = start(&[
        ("DASHBOARD_ENABLED", "false"),
        ("DASHBOARD_TOKEN", DASHBOARD_TOKEN),
    ])
    .await;
    for path in ["/dev/dashboard", "/dev/dashboard/stats"] {
        let res = get(server.addr, &format!("{path}?token={DASHBOARD_TOKEN}"), &[]).await;
        assert_eq!(res.status, 404, "{path}");
        assert!(res.body.contains("DASHBOARD_ENABLED"), "{}", res.body);
    }
    // The rest of the server is unaffected.
    assert_eq!(get(server.addr, "/health/live", &[]).await.status, 200);
    server.stop().await;
}
