//! `gateway`: the WebSocket gateway as its own process (distributed mode),
//! talking to services over NATS.

use std::sync::Arc;

use quckchat_gateway::{Gateway, GatewayConfig};
use quckchat_runtime::admin::{self, BusHealth, Health};
use quckchat_runtime::bus::{Bus, NatsBus};
use quckchat_runtime::config::{exit_on_config_error, ConfigReader, ProcessEnv};
use quckchat_runtime::{server, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    telemetry::init();
    let mut reader = ConfigReader::new(&ProcessEnv);
    let config =
        GatewayConfig::read(&mut reader, None).unwrap_or_else(|e| exit_on_config_error(&e));
    reader.log("gateway");
    if let Err(err) = run(config).await {
        eprintln!("gateway: {err:#}");
        std::process::exit(1);
    }
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
    let router = gateway.router().merge(admin::router(health.clone()));
    let listener = server::bind(config.server.listen_addr()).await?;
    tracing::info!(addr = %config.server.listen_addr(), "gateway listening");
    health.set_started();
    let draining = {
        let (token, health) = (token.clone(), health.clone());
        async move {
            token.cancelled().await;
            health.set_draining();
        }
    };
    let (served, ()) = tokio::join!(server::serve(listener, router, token.clone()), draining);
    served?;
    gateway.drained(config.server.drain).await;
    tracing::info!("gateway stopped");
    Ok(())
}
