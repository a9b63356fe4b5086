//! `presence-svc`: the presence service as its own process (distributed
//! mode): gateway reports from NATS, state in Redis, gRPC and admin HTTP on
//! `PORT`.

use std::sync::Arc;

use quckchat_presence::config::PresenceConfig;
use quckchat_presence::grpc::PresenceGrpc;
use quckchat_presence::service::{ChatMemberships, PresenceService};
use quckchat_presence::state::{PresenceState, RedisState};
use quckchat_runtime::admin::{self, BusHealth, Health};
use quckchat_runtime::bus::{Bus, NatsBus, Subjects};
use quckchat_runtime::{process, server, shutdown};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let config = process::start("presence-svc", PresenceConfig::read);
    process::finish("presence-svc", run(config).await);
}

async fn run(config: PresenceConfig) -> anyhow::Result<()> {
    let bus: Arc<dyn Bus> = Arc::new(
        NatsBus::connect(&config.bus.nats_url, &config.server.node_name)
            .await
            .map_err(|e| anyhow::anyhow!("NATS_URL: {e}"))?,
    );
    let state: Arc<dyn PresenceState> = Arc::new(
        RedisState::connect(&config.redis_url, &config.redis_key_prefix)
            .await
            .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?,
    );
    let memberships = Arc::new(
        ChatMemberships::new(&config.chat_grpc_url)
            .map_err(|e| anyhow::anyhow!("CHAT_GRPC_URL: {e}"))?,
    );
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    let subjects = Subjects::new(config.bus.subject_prefix.clone());
    let service = Arc::new(PresenceService::new(
        state.clone(),
        bus.clone(),
        subjects,
        memberships,
        config.timing,
    ));
    let worker = service.start(token.clone()).await?;
    let health = Health::new(
        config.server.node_name.clone(),
        vec![
            Arc::new(BusHealth(bus)),
            admin::health_check("redis", state.clone(), |s| s.ping()),
        ],
    );
    let router = admin::router(health.clone())
        .merge(tonic::service::Routes::new(PresenceGrpc::server(state)).into_axum_router());
    let listener = server::bind(config.server.listen_addr()).await?;
    tracing::info!(addr = %config.server.listen_addr(), "presence-svc listening");
    server::serve_with_health(listener, router, token, health.clone()).await?;
    worker.await?;
    tracing::info!("presence-svc stopped");
    Ok(())
}
