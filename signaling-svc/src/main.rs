//! `signaling-svc`: the signaling service as its own process (distributed
//! mode): client commands from NATS, live calls in Redis, the call log in
//! MongoDB, gRPC and admin HTTP on `PORT`.

use std::sync::Arc;

use quckchat_runtime::admin::health_check;
use quckchat_runtime::config::{MONGODB_URL, REDIS_URL};
use quckchat_runtime::process::{self, Node};
use quckchat_signaling::chat::GrpcConversations;
use quckchat_signaling::config::{SignalingConfig, CHAT_GRPC_URL, HUDDLE_GRPC_URL};
use quckchat_signaling::grpc::SignalingGrpc;
use quckchat_signaling::huddles::GrpcHuddles;
use quckchat_signaling::log::{CallLog, MongoCallLog};
use quckchat_signaling::service::SignalingService;
use quckchat_signaling::state::{CallState, RedisCallState};

/// jemalloc, not the system allocator: a message's path allocates a lot, and
/// glibc's malloc cost ~1.35× in throughput (bench/ANALYSIS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let config = process::start("signaling-svc", SignalingConfig::read);
    process::finish("signaling-svc", run(config).await);
}

async fn run(config: SignalingConfig) -> anyhow::Result<()> {
    let node = Node::connect(
        "signaling-svc",
        &config.server,
        &config.bus,
        &config.grpc_token,
    )
    .await?;
    let state: Arc<dyn CallState> = Arc::new(
        RedisCallState::connect(&config.redis_url, &config.redis_key_prefix)
            .await
            .map_err(|e| anyhow::anyhow!("{REDIS_URL}: {e}"))?,
    );
    let log: Arc<dyn CallLog> = Arc::new(
        MongoCallLog::connect(&config.mongodb_url)
            .await
            .map_err(|e| anyhow::anyhow!("{MONGODB_URL}: {e}"))?,
    );
    let chat = GrpcConversations::new(&config.chat_grpc_url, node.grpc_token())
        .map_err(|e| anyhow::anyhow!("{CHAT_GRPC_URL}: {e}"))?;
    let huddles = GrpcHuddles::new(&config.huddle_grpc_url, node.grpc_token())
        .map_err(|e| anyhow::anyhow!("{HUDDLE_GRPC_URL}: {e}"))?;
    let service = Arc::new(
        SignalingService::new(
            state.clone(),
            log.clone(),
            node.bus(),
            node.subjects().clone(),
            config.settings.ice.clone(),
            config.settings.timing,
        )
        .with_chat(Arc::new(chat))
        .with_huddles(Arc::new(huddles)),
    );
    let worker = service.clone().start(node.shutdown(), node.drain()).await?;
    let checks = vec![
        health_check("redis", state, |s| s.ping()),
        health_check("store", log, |l| l.ping()),
    ];
    let grpc = tonic::service::Routes::new(SignalingGrpc::server(service));
    node.serve(checks, grpc, vec![worker]).await
}
