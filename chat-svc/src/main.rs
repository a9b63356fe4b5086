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
use quckchat_runtime::config::{exit_on_config_error, ConfigReader, ProcessEnv};
use quckchat_runtime::{server, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    telemetry::init();
    let mut reader = ConfigReader::new(&ProcessEnv);
    let config = ChatConfig::read(&mut reader).unwrap_or_else(|e| exit_on_config_error(&e));
    reader.log("chat-svc");
    if let Err(err) = run(config).await {
        eprintln!("chat-svc: {err:#}");
        std::process::exit(1);
    }
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
    health.set_started();
    let draining = {
        let (token, health) = (token.clone(), health.clone());
        async move {
            token.cancelled().await;
            health.set_draining();
        }
    };
    let (served, ()) = tokio::join!(server::serve(listener, router, token), draining);
    served?;
    consumer.await?;
    tracing::info!("chat-svc stopped");
    Ok(())
}
