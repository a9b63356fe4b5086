//! Serving HTTP (WebSocket upgrades, admin, and gRPC over h2c) on one port.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (PORT/BIND_ADDRESS): {e}"))
}

/// Serves `router` until `shutdown` is cancelled, then stops accepting and
/// lets in-flight HTTP requests finish. Accept errors such as EMFILE are
/// retried with a pause by axum, never in a busy loop.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // gRPC routes bring a catch-all answering "unimplemented"; plain HTTP
    // clients get a 404 instead.
    let router = router.fallback(|| async { (StatusCode::NOT_FOUND, "not found") });
    // Frames are small and latency matters: no Nagle delay.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
