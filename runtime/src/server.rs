//! Serving HTTP (WebSocket upgrades, admin, and gRPC over h2c) on one port,
//! behind the guards every listener needs:
//!
//! - a **header-read timeout**: a connection must finish each HTTP/1 request
//!   head within [`ServeLimits::header_read_timeout`] (from accept, and again
//!   after every response), or it is closed; slowloris and idle sockets that
//!   never upgrade hold no file for long. Upgraded (101) and HTTP/2
//!   connections are not timed here;
//! - a **connection cap** ([`ServeLimits::max_connections`], by default the
//!   open-files limit minus [`FD_HEADROOM`]): past it a connection may only
//!   ask `/health*` or `/metrics` (everything else gets 503 and the
//!   connection closes), at most [`OVERFLOW`] such connections at once, the
//!   oldest closed to make room, so health checks keep answering;
//! - accept errors back off: out of files (EMFILE/ENFILE) or other resources
//!   pauses the accept loop briefly, growing to 1 s, never a busy loop.
//!
//! Handlers see the peer as `ConnectInfo<`[`ConnMeta`]`>`.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderValue, StatusCode, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::config::{ConfigError, ConfigReader};

pub const MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
pub const HEADER_READ_TIMEOUT_SECS: &str = "HEADER_READ_TIMEOUT_SECS";

/// Files kept free below the open-files limit by the default connection cap:
/// health checks past the cap, the bus, the store, logs.
pub const FD_HEADROOM: usize = 512;
/// Connections let in past the cap, for health checks and `/metrics` only.
pub const OVERFLOW: usize = 64;
/// Header-read timeout of a connection past the cap.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The cap when the open-files limit cannot be read.
const FALLBACK_MAX_CONNECTIONS: usize = 4096;
/// Longest pause of the accept loop after an error.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Connection limits of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Time to send a complete HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// Open connections served normally; see the module docs for past it.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: default_max_connections(open_files_limit()),
        }
    }
}

impl ServeLimits {
    /// `HEADER_READ_TIMEOUT_SECS` (10) and `MAX_CONNECTIONS` (the soft
    /// RLIMIT_NOFILE − 512).
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            header_read_timeout: r
                .secs(HEADER_READ_TIMEOUT_SECS, d.header_read_timeout.as_secs())?,
            max_connections: r.positive(MAX_CONNECTIONS, d.max_connections)?,
        })
    }
}

/// The soft open-files limit of this process (RLIMIT_NOFILE), from
/// `/proc/self/limits`; `None` where that cannot be read.
pub fn open_files_limit() -> Option<u64> {
    parse_open_files_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line["Max open files".len()..].split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        soft => soft.parse().ok(),
    }
}

/// The cap for an open-files `limit`: the limit less [`FD_HEADROOM`] (at
/// least half of it).
pub fn default_max_connections(limit: Option<u64>) -> usize {
    match limit {
        Some(limit) => {
            let limit = usize::try_from(limit.min(1 << 24)).unwrap_or(1 << 24);
            limit.saturating_sub(FD_HEADROOM).max(limit / 2).max(1)
        }
        None => FALLBACK_MAX_CONNECTIONS,
    }
}

/// What an accept error means for the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// One connection failed before it was accepted: accept the next now.
    Connection,
    /// Out of files (EMFILE, ENFILE) or kernel memory: wait for some to close.
    Exhausted,
    /// Anything else: pause, then retry.
    Other,
}

impl AcceptError {
    fn label(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Exhausted => "exhausted",
            Self::Other => "other",
        }
    }
}

const ENOMEM: i32 = 12;
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const ENOBUFS: i32 = 105;

pub fn classify_accept_error(err: &io::Error) -> AcceptError {
    match err.kind() {
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted => return AcceptError::Connection,
        io::ErrorKind::OutOfMemory => return AcceptError::Exhausted,
        _ => {}
    }
    match err.raw_os_error() {
        Some(EMFILE | ENFILE | ENOMEM | ENOBUFS) => AcceptError::Exhausted,
        _ => AcceptError::Other,
    }
}

/// The pause after an accept error, `failures` errors in a row before it:
/// none for a failed connection; otherwise 10 ms (exhausted) or 50 ms
/// (other), doubling up to 1 s.
pub fn accept_backoff(kind: AcceptError, failures: u32) -> Option<Duration> {
    let first = match kind {
        AcceptError::Connection => return None,
        AcceptError::Exhausted => Duration::from_millis(10),
        AcceptError::Other => Duration::from_millis(50),
    };
    Some(
        first
            .saturating_mul(1u32 << failures.min(16))
            .min(MAX_ACCEPT_BACKOFF),
    )
}

/// The peer of a connection, as handlers see it (`ConnectInfo<ConnMeta>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnMeta {
    pub peer: SocketAddr,
    /// Accepted past the connection cap: health checks only.
    pub over_capacity: bool,
}

impl Connected<IncomingStream<'_, GuardedListener>> for ConnMeta {
    fn connect_info(stream: IncomingStream<'_, GuardedListener>) -> Self {
        Self {
            peer: *stream.remote_addr(),
            over_capacity: stream.io().over_capacity,
        }
    }
}

/// A TCP listener enforcing [`ServeLimits`].
pub struct GuardedListener {
    inner: TcpListener,
    limits: ServeLimits,
    open: Arc<AtomicUsize>,
    /// Connections past the cap, oldest first (cancelled = gone).
    overflow: VecDeque<CancellationToken>,
    failures: u32,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, limits: ServeLimits) -> Self {
        Self {
            inner,
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            overflow: VecDeque::new(),
            failures: 0,
        }
    }

    fn admit(&mut self, tcp: TcpStream) -> GuardedIo {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        metrics::gauge!("quckchat_http_connections_open").set(open as f64);
        let mut slot = Slot {
            open: self.open.clone(),
            overflow: None,
        };
        let mut timeout = self.limits.header_read_timeout;
        let mut evicted = None;
        if open > self.limits.max_connections {
            metrics::counter!("quckchat_http_connections_over_capacity_total").increment(1);
            self.overflow.retain(|t| !t.is_cancelled());
            while self.overflow.len() >= OVERFLOW {
                if let Some(oldest) = self.overflow.pop_front() {
                    metrics::counter!("quckchat_http_connections_evicted_total").increment(1);
                    oldest.cancel();
                }
            }
            let token = CancellationToken::new();
            self.overflow.push_back(token.clone());
            evicted = Some(Box::pin(token.clone().cancelled_owned()));
            slot.overflow = Some(token);
            timeout = timeout.min(OVERFLOW_HEADER_TIMEOUT);
        }
        // Frames are small and latency matters: no Nagle delay.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "TCP_NODELAY not set");
        }
        GuardedIo {
            tcp,
            _slot: slot,
            over_capacity: evicted.is_some(),
            head_timeout: timeout,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            newlines: 0,
            upgraded: false,
            evicted,
        }
    }
}

impl Listener for GuardedListener {
    type Io = GuardedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedIo, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, peer)) => {
                    self.failures = 0;
                    return (self.admit(tcp), peer);
                }
                Err(err) => {
                    let kind = classify_accept_error(&err);
                    metrics::counter!("quckchat_http_accept_errors_total", "kind" => kind.label())
                        .increment(1);
                    if let Some(pause) = accept_backoff(kind, self.failures) {
                        self.failures = self.failures.saturating_add(1);
                        if self.failures.is_power_of_two() {
                            tracing::warn!(%err, ?pause, failures = self.failures, "accept error: pausing");
                        }
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Counts a connection while it lives.
struct Slot {
    open: Arc<AtomicUsize>,
    overflow: Option<CancellationToken>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let open = self.open.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("quckchat_http_connections_open").set(open as f64);
        if let Some(token) = &self.overflow {
            token.cancel();
        }
    }
}

/// A connection of a [`GuardedListener`].
pub struct GuardedIo {
    tcp: TcpStream,
    _slot: Slot,
    over_capacity: bool,
    head_timeout: Duration,
    /// Armed while a request head is awaited.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Line ends in a row seen while the deadline is armed (`\r` ignored).
    newlines: u8,
    /// Switched protocols (101): no more heads to time.
    upgraded: bool,
    /// Cancelled to make room for a newer connection past the cap.
    evicted: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

/// Whether `bytes` complete the request head being awaited; `newlines`
/// carries line ends in a row from one read to the next.
fn head_completed(newlines: &mut u8, bytes: &[u8]) -> bool {
    for &b in bytes {
        match b {
            b'\n' => {
                *newlines += 1;
                if *newlines == 2 {
                    *newlines = 0;
                    return true;
                }
            }
            b'\r' => {}
            _ => *newlines = 0,
        }
    }
    false
}

impl GuardedIo {
    /// Notes a response head being written: a 101 ends the timing, any
    /// other response starts waiting for the next request head.
    fn writing(&mut self, bytes: &[u8], cx: &mut Context<'_>) {
        if self.upgraded || !bytes.starts_with(b"HTTP/1.") || bytes.len() < 12 {
            return;
        }
        if &bytes[9..12] == b"101" {
            self.upgraded = true;
            self.deadline = None;
        } else if self.deadline.is_none() {
            self.newlines = 0;
            let mut deadline = Box::pin(tokio::time::sleep(self.head_timeout));
            // Registers this task's waker: the connection may not read again
            // before the deadline, and must then be woken to close.
            let _ = deadline.as_mut().poll(cx);
            self.deadline = Some(deadline);
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(evicted) = this.evicted.as_mut() {
            if evicted.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "closed to make room: over the connection cap",
                )));
            }
        }
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                metrics::counter!("quckchat_http_header_timeouts_total").increment(1);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not received in time",
                )));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(())))
            && this.deadline.is_some()
            && head_completed(&mut this.newlines, &buf.filled()[before..])
        {
            this.deadline = None;
        }
        read
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.writing(buf, cx);
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.writing(first, cx);
        }
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Past the cap: health checks and metrics only, one request per connection.
async fn capacity_gate(request: Request, next: Next) -> Response {
    let over = request
        .extensions()
        .get::<ConnectInfo<ConnMeta>>()
        .is_some_and(|c| c.0.over_capacity);
    if !over {
        return next.run(request).await;
    }
    let http1 = matches!(
        request.version(),
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    );
    let path = request.uri().path();
    let health = path == "/health" || path.starts_with("/health/") || path == "/metrics";
    let mut response = if health {
        next.run(request).await
    } else {
        metrics::counter!("quckchat_http_connections_refused_total", "reason" => "capacity")
            .increment(1);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "server at its connection limit: retry later",
        )
            .into_response()
    };
    if http1 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (PORT/BIND_ADDRESS): {e}"))
}

/// Serves `router` until `shutdown` is cancelled, then stops accepting and
/// lets in-flight HTTP requests finish; default [`ServeLimits`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_limited(listener, router, shutdown, ServeLimits::default()).await
}

/// [`serve`] with these limits.
pub async fn serve_limited(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: ServeLimits,
) -> anyhow::Result<()> {
    serve_until(listener, router, limits, shutdown.cancelled_owned()).await
}

/// Serves `router` with `limits` until `stop` resolves, then stops accepting
/// and lets in-flight HTTP requests finish.
async fn serve_until(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Some(files) = open_files_limit() {
        if limits.max_connections as u64 >= files {
            tracing::warn!(
                max_connections = limits.max_connections,
                open_files_limit = files,
                "MAX_CONNECTIONS is not below the open-files limit: accept may fail with EMFILE"
            );
        }
    }
    // gRPC routes bring a catch-all answering "unimplemented"; plain HTTP
    // clients get a 404 instead.
    let router = router
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .layer(axum::middleware::from_fn(capacity_gate));
    let listener = GuardedListener::new(listener, limits);
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<ConnMeta>(),
    )
    .with_graceful_shutdown(stop)
    .await?;
    Ok(())
}

/// Serves `router` like [`serve`], with `health` ready from now on and
/// draining as soon as `shutdown` begins: the port stays open until
/// `drained` resolves (awaited only after `shutdown`), answering
/// `/health/ready` with 503 so load balancers stop sending traffic while
/// what is in flight finishes; then it stops accepting.
pub async fn serve_with_health(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    health: std::sync::Arc<crate::admin::Health>,
    drained: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_health_limited(
        listener,
        router,
        shutdown,
        health,
        ServeLimits::default(),
        drained,
    )
    .await
}

/// [`serve_with_health`] with these limits.
pub async fn serve_with_health_limited(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    health: std::sync::Arc<crate::admin::Health>,
    limits: ServeLimits,
    drained: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    health.set_started();
    let stop = async move {
        shutdown.cancelled().await;
        health.set_draining();
        drained.await;
    };
    serve_until(listener, router, limits, stop).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn out_of_files_backs_off_and_connection_errors_do_not() {
        for code in [EMFILE, ENFILE, ENOBUFS, ENOMEM] {
            let err = io::Error::from_raw_os_error(code);
            assert_eq!(classify_accept_error(&err), AcceptError::Exhausted, "{err}");
        }
        let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(classify_accept_error(&reset), AcceptError::Connection);
        assert_eq!(accept_backoff(AcceptError::Connection, 5), None);
        let other = io::Error::other("weird");
        assert_eq!(classify_accept_error(&other), AcceptError::Other);

        // Never a busy loop: every pause is positive, grows, and stays ≤ 1 s.
        let pauses: Vec<Duration> = (0..40)
            .map(|n| accept_backoff(AcceptError::Exhausted, n).unwrap())
            .collect();
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), MAX_ACCEPT_BACKOFF);
        assert!(accept_backoff(AcceptError::Other, 0).unwrap() > Duration::ZERO);
        assert_eq!(
            accept_backoff(AcceptError::Other, u32::MAX),
            Some(MAX_ACCEPT_BACKOFF)
        );
    }

    #[test]
    fn cap_keeps_headroom_below_the_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63419                63419                processes \n\
                      Max open files            20000                1048576              files     \n";
        assert_eq!(parse_open_files_limit(limits), Some(20000));
        assert_eq!(
            parse_open_files_limit(
                "Max open files            unlimited            unlimited            files"
            ),
            Some(u64::MAX)
        );
        assert_eq!(parse_open_files_limit("nothing"), None);
        assert_eq!(default_max_connections(Some(20000)), 19488);
        assert_eq!(default_max_connections(Some(1024)), 512);
        assert_eq!(default_max_connections(Some(256)), 128);
        assert_eq!(default_max_connections(None), FALLBACK_MAX_CONNECTIONS);
        assert!(default_max_connections(Some(u64::MAX)) > 1_000_000);
        // This process's own limit is readable on Linux.
        if cfg!(target_os = "linux") {
            assert!(open_files_limit().is_some());
        }
    }

    #[test]
    fn head_end_is_found_across_reads() {
        let mut newlines = 0;
        assert!(!head_completed(
            &mut newlines,
            b"GET / HTTP/1.1\r\nHost: x\r"
        ));
        assert!(head_completed(&mut newlines, b"\n\r\n"));
        assert!(!head_completed(&mut newlines, b"\r\nx\n"));
        assert!(head_completed(&mut newlines, b"\n"));
    }

    #[test]
    fn limits_are_read_from_the_environment() {
        let env: std::collections::HashMap<&str, &str> = std::collections::HashMap::from([
            (MAX_CONNECTIONS, "7"),
            (HEADER_READ_TIMEOUT_SECS, "3"),
        ]);
        let limits = ServeLimits::read(&mut ConfigReader::new(&env)).unwrap();
        assert_eq!(limits.max_connections, 7);
        assert_eq!(limits.header_read_timeout, Duration::from_secs(3));
        let env: std::collections::HashMap<&str, &str> =
            std::collections::HashMap::from([(MAX_CONNECTIONS, "0")]);
        let err = ServeLimits::read(&mut ConfigReader::new(&env)).unwrap_err();
        assert_eq!(err.key, MAX_CONNECTIONS);
    }

    async fn serve_on_loopback(limits: ServeLimits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let router = Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .route("/work", axum::routing::get(|| async { "done" }));
        tokio::spawn(serve_limited(listener, router, stop.clone(), limits));
        (addr, stop)
    }

    /// Reads until EOF or error; how long that took.
    async fn closed_within(tcp: &mut TcpStream, bound: Duration) -> Option<Duration> {
        let start = tokio::time::Instant::now();
        let mut buf = [0u8; 512];
        tokio::time::timeout(bound, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return start.elapsed(),
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn while_draining_ready_answers_503_and_the_port_closes_after() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let health = crate::admin::Health::new("n", Vec::new());
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve_with_health(
            listener,
            crate::admin::router(health.clone()),
            stop.clone(),
            health,
            async move {
                let _ = drained_rx.await;
            },
        ));
        assert!(get(addr, "/health/ready").await.starts_with("HTTP/1.1 200"));
        stop.cancel();
        // Draining: the port stays open and says so.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ready = get(addr, "/health/ready").await;
            if ready.starts_with("HTTP/1.1 503") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{ready}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !served.is_finished(),
            "stopped serving before the drain ended"
        );
        // Drained: it stops accepting and returns.
        drained_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("serving ended once drained")
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "the port closed");
    }

    #[tokio::test]
    async fn slow_request_head_and_idle_keepalive_are_closed() {
        let limits = ServeLimits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 100,
        };
        let (addr, stop) = serve_on_loopback(limits).await;
        // One byte, then nothing: closed by the timeout, not kept.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"G").await.unwrap();
        let took = closed_within(&mut slow, Duration::from_secs(5)).await;
        assert!(
            took.is_some_and(|t| t >= Duration::from_millis(250)),
            "{took:?}"
        );
        // A complete request is answered; the idle keep-alive after it closes.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /work HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        assert!(closed_within(&mut tcp, Duration::from_secs(5))
            .await
            .is_some());
        stop.cancel();
    }

    #[tokio::test]
    async fn past_the_cap_only_health_is_answered() {
        let limits = ServeLimits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 2,
        };
        let (addr, stop) = serve_on_loopback(limits).await;
        let _held: Vec<TcpStream> = vec![
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        let work = get(addr, "/work").await;
        assert!(work.starts_with("HTTP/1.1 503"), "{work}");
        assert!(
            work.to_ascii_lowercase().contains("connection: close"),
            "{work}"
        );
        let health = get(addr, "/health").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        // More idle connections past the cap than the overflow allows: the
        // oldest are closed, and health still answers.
        let mut extra = Vec::new();
        for _ in 0..OVERFLOW + 4 {
            extra.push(TcpStream::connect(addr).await.unwrap());
        }
        let health = get(addr, "/health").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(closed_within(&mut extra[0], Duration::from_secs(3))
            .await
            .is_some());
        stop.cancel();
    }
}
