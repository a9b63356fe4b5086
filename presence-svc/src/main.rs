//! `presence-svc`: the presence service as its own process (distributed
//! mode): gateway reports from NATS, state in Redis, gRPC and admin HTTP on
//! `PORT`.

use std::sync::Arc;

use quckchat_presence::config::{PresenceConfig, CHAT_GRPC_URL};
use quckchat_presence::grpc::PresenceGrpc;
use quckchat_presence::service::{ChatMemberships, PresenceService};
use quckchat_presence::state::{PresenceState, RedisState};
use quckchat_runtime::admin::health_check;
use quckchat_runtime::config::REDIS_URL;
use quckchat_runtime::process::{self, Node};

/// jemalloc, not the system allocator: a message's path allocates a lot, and
/// glibc's malloc cost ~1.35× in throughput (bench/ANALYSIS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let config = process::start("presence-svc", PresenceConfig::read);
    process::finish("presence-svc", run(config).await);
}

async fn run(config: PresenceConfig) -> anyhow::Result<()> {
    let node = Node::connect(
        "presence-svc",
        &config.server,
        &config.bus,
        &config.grpc_token,
    )
    .await?;
    let state: Arc<dyn PresenceState> = Arc::new(
        RedisState::connect(&config.redis_url, &config.redis_key_prefix)
            .await
            .map_err(|e| anyhow::anyhow!("{REDIS_URL}: {e}"))?,
    );
    let memberships = Arc::new(
        ChatMemberships::new(&config.chat_grpc_url, node.grpc_token())
            .map_err(|e| anyhow::anyhow!("{CHAT_GRPC_URL}: {e}"))?,
    );
    let presence = Arc::new(PresenceService::new(
        state.clone(),
        node.bus(),
        node.subjects().clone(),
        memberships,
        config.timing,
    ));
    let worker = presence.start(node.shutdown(), node.drain()).await?;
    let checks = vec![health_check("redis", state.clone(), |s| s.ping())];
    let grpc = tonic::service::Routes::new(PresenceGrpc::server(state));
    node.serve(checks, grpc, vec![worker]).await
}
