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

/// Serves `router` like [`serve`], with `health` ready from now on and
/// draining as soon as `shutdown` begins, so load balancers stop sending
/// traffic while what is in flight finishes.
pub async fn serve_with_health(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    health: std::sync::Arc<crate::admin::Health>,
) -> anyhow::Result<()> {
    health.set_started();
    let draining = {
        let (shutdown, health) = (shutdown.clone(), health.clone());
        async move {
            shutdown.cancelled().await;
            health.set_draining();
        }
    };
    let (served, ()) = tokio::join!(serve(listener, router, shutdown), draining);
    served
}
