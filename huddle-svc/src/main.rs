//! `huddle-svc`: the huddle service as its own process (distributed mode):
//! client commands from NATS, live rooms in Redis, huddles in MongoDB, gRPC
//! and admin HTTP on `PORT`.

use std::sync::Arc;

use quckchat_huddle::config::{HuddleConfig, CHAT_GRPC_URL};
use quckchat_huddle::grpc::HuddleGrpc;
use quckchat_huddle::service::HuddleService;
use quckchat_huddle::state::{RedisRoomState, RoomState};
use quckchat_huddle::store::{HuddleStore, MongoHuddleStore};
use quckchat_runtime::admin::health_check;
use quckchat_runtime::config::{MONGODB_URL, REDIS_URL};
use quckchat_runtime::process::{self, Node};
use quckchat_signaling::chat::GrpcConversations;

/// jemalloc, not the system allocator: a message's path allocates a lot, and
/// glibc's malloc cost ~1.35× in throughput (bench/ANALYSIS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let config = process::start("huddle-svc", HuddleConfig::read);
    process::finish("huddle-svc", run(config).await);
}

async fn run(config: HuddleConfig) -> anyhow::Result<()> {
    let node = Node::connect(
        "huddle-svc",
        &config.server,
        &config.bus,
        &config.grpc_token,
    )
    .await?;
    let state: Arc<dyn RoomState> = Arc::new(
        RedisRoomState::connect(&config.redis_url, &config.redis_key_prefix)
            .await
            .map_err(|e| anyhow::anyhow!("{REDIS_URL}: {e}"))?,
    );
    let store: Arc<dyn HuddleStore> = Arc::new(
        MongoHuddleStore::connect(&config.mongodb_url)
            .await
            .map_err(|e| anyhow::anyhow!("{MONGODB_URL}: {e}"))?,
    );
    let chat = GrpcConversations::new(&config.chat_grpc_url, node.grpc_token())
        .map_err(|e| anyhow::anyhow!("{CHAT_GRPC_URL}: {e}"))?;
    let service = Arc::new(
        HuddleService::new(
            store.clone(),
            state.clone(),
            node.bus(),
            node.subjects().clone(),
            config.settings.clone(),
        )
        .with_chat(Arc::new(chat)),
    );
    let worker = service.clone().start(node.shutdown(), node.drain()).await?;
    let checks = vec![
        health_check("redis", state, |s| s.ping()),
        health_check("store", store, |s| s.ping()),
    ];
    let grpc = tonic::service::Routes::new(HuddleGrpc::server(service));
    node.serve(checks, grpc, vec![worker]).await
}
