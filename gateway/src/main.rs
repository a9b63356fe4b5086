//! `gateway`: the WebSocket gateway as its own process (distributed mode),
//! talking to services over NATS.

use std::sync::Arc;

use quckchat_gateway::{Gateway, GatewayConfig};
use quckchat_runtime::admin::{self, BusHealth, Health};
use quckchat_runtime::bus::{Bus, NatsBus};
use quckchat_runtime::dashboard::{self, Scope};
use quckchat_runtime::{process, server, shutdown};
use tokio_util::sync::CancellationToken;

/// jemalloc, not the system allocator: a message's path allocates a lot, and
/// glibc's malloc cost ~1.35× in throughput (bench/ANALYSIS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let config = process::start("gateway", |r| GatewayConfig::read(r, None));
    process::finish("gateway", run(config).await);
}

async fn run(config: GatewayConfig) -> anyhow::Result<()> {
    let bus: Arc<dyn Bus> = Arc::new(
        NatsBus::connect(&config.bus.nats_url, &config.server.node_name)
            .await
            .map_err(|e| anyhow::anyhow!("NATS_URL: {e}"))?,
    );
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    let health = Health::new(
        config.server.node_name.clone(),
        vec![Arc::new(BusHealth(bus.clone()))],
    );
    let gateway = Gateway::new(config.clone(), bus, token.clone());
    let router = gateway
        .router()
        .merge(admin::router(health.clone()))
        .merge(dashboard::router(
            config.dashboard.clone(),
            health.clone(),
            Scope::Gateway,
        ));
    let listener = server::bind(config.server.listen_addr()).await?;
    tracing::info!(addr = %config.server.listen_addr(), "gateway listening");
    server::serve_with_health_limited(
        listener,
        router,
        token.clone(),
        health.clone(),
        config.connections,
        // Sockets close over the drain window while the port answers 503.
        {
            let (gateway, drain) = (gateway.clone(), config.server.drain);
            async move { gateway.drained(drain).await }
        },
    )
    .await?;
    tracing::info!("gateway stopped");
    Ok(())
}
