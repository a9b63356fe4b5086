//! `chat-svc`: the chat service as its own process (distributed mode): client
//! commands from NATS, state in MongoDB (or, with `CHAT_STORE=embedded`, the
//! all-in-one SQLite store of a single replica), gRPC and admin HTTP on `PORT`.

use std::sync::Arc;

use quckchat_chat::commands;
use quckchat_chat::config::{ChatConfig, StoreConfig, PRESENCE_GRPC_URL};
use quckchat_chat::grpc::ChatGrpc;
use quckchat_chat::presence::GrpcPresence;
use quckchat_chat::service::ChatService;
use quckchat_chat::store::{ChatStore, EmbeddedStore, MongoStore};
use quckchat_runtime::admin::health_check;
use quckchat_runtime::config::{DATA_DIR, MONGODB_URL};
use quckchat_runtime::process::{self, Node};

/// jemalloc, not the system allocator: a message's path allocates a lot, and
/// glibc's malloc cost ~1.35× in throughput (bench/ANALYSIS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let config = process::start("chat-svc", ChatConfig::read);
    process::finish("chat-svc", run(config).await);
}

async fn run(config: ChatConfig) -> anyhow::Result<()> {
    let node = Node::connect("chat-svc", &config.server, &config.bus, &config.grpc_token).await?;
    let store: Arc<dyn ChatStore> = match &config.store {
        StoreConfig::Mongo { url } => Arc::new(
            MongoStore::connect(url)
                .await
                .map_err(|e| anyhow::anyhow!("{MONGODB_URL}: {e}"))?,
        ),
        StoreConfig::Embedded { data_dir } => {
            Arc::new(EmbeddedStore::open(data_dir).map_err(|e| anyhow::anyhow!("{DATA_DIR}: {e}"))?)
        }
    };
    let mut chat = ChatService::new(store.clone(), node.bus(), node.subjects().clone());
    if let Some(url) = &config.presence_grpc_url {
        let presence = GrpcPresence::new(url, node.grpc_token())
            .map_err(|e| anyhow::anyhow!("{PRESENCE_GRPC_URL}: {e}"))?;
        chat = chat.with_presence(Arc::new(presence));
    }
    let chat = Arc::new(chat);
    let consumer = commands::serve(
        chat.clone(),
        node.bus(),
        node.subjects(),
        node.shutdown(),
        node.drain(),
    )
    .await?;
    let checks = vec![health_check("store", store, |s| s.ping())];
    let grpc = tonic::service::Routes::new(ChatGrpc::server(chat));
    node.serve(checks, grpc, vec![consumer]).await
}
