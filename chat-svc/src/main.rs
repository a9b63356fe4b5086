//! `chat-svc`: the chat service as its own process (distributed mode): client
//! commands from NATS, state in MongoDB, gRPC and admin HTTP on `PORT`.

use std::sync::Arc;

use quckchat_chat::config::ChatConfig;
use quckchat_chat::grpc::ChatGrpc;
use quckchat_chat::presence::GrpcPresence;
use quckchat_chat::service::ChatService;
use quckchat_chat::store::{ChatStore, MongoStore};
use quckchat_chat::{commands, StoreHealth};
use quckchat_runtime::admin::{self, BusHealth, Health};
use quckchat_runtime::bus::{Bus, NatsBus, Subjects};
use quckchat_runtime::{process, server, shutdown};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let config = process::start("chat-svc", ChatConfig::read);
    process::finish("chat-svc", run(config).await);
}

async fn run(config: ChatConfig) -> anyhow::Result<()> {
    let bus: Arc<dyn Bus> = Arc::new(
        NatsBus::connect(&config.bus.nats_url, &config.server.node_name)
            .await
            .map_err(|e| anyhow::anyhow!("NATS_URL: {e}"))?,
    );
    let store: Arc<dyn ChatStore> = Arc::new(
        MongoStore::connect(&config.mongodb_url)
            .await
            .map_err(|e| anyhow::anyhow!("MONGODB_URL: {e}"))?,
    );
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    let subjects = Subjects::new(config.bus.subject_prefix.clone());
    let mut service = ChatService::new(store.clone(), bus.clone(), subjects.clone());
    if let Some(url) = &config.presence_grpc_url {
        let presence =
            GrpcPresence::new(url).map_err(|e| anyhow::anyhow!("PRESENCE_GRPC_URL: {e}"))?;
        service = service.with_presence(Arc::new(presence));
    }
    let service = Arc::new(service);
    let consumer = commands::serve(
        service.clone(),
        bus.clone(),
        &subjects,
        token.clone(),
        config.server.drain,
    )
    .await?;
    let health = Health::new(
        config.server.node_name.clone(),
        vec![Arc::new(BusHealth(bus)), Arc::new(StoreHealth(store))],
    );
    let router = admin::router(health.clone())
        .merge(tonic::service::Routes::new(ChatGrpc::server(service)).into_axum_router());
    let listener = server::bind(config.server.listen_addr()).await?;
    tracing::info!(addr = %config.server.listen_addr(), "chat-svc listening");
    server::serve_with_health(listener, router, token, health.clone()).await?;
    consumer.await?;
    tracing::info!("chat-svc stopped");
    Ok(())
}
