//! `push-svc`: the push service as its own process (distributed mode):
//! notices through a JetStream work queue, the device registry in MongoDB,
//! the sent log in Redis, gRPC and admin HTTP on `PORT`.

use std::sync::Arc;

use quckchat_push::apps;
use quckchat_push::clients::{GrpcChat, GrpcOnline};
use quckchat_push::config::{PushConfig, CHAT_GRPC_URL, PRESENCE_GRPC_URL};
use quckchat_push::deliver::{Deliverer, RetryPolicy};
use quckchat_push::devices::{Devices, MongoDevices};
use quckchat_push::grpc::PushGrpc;
use quckchat_push::queue;
use quckchat_push::sent::RedisSentLog;
use quckchat_push::service::PushService;
use quckchat_runtime::admin::health_check;
use quckchat_runtime::bus::NatsBus;
use quckchat_runtime::config::{MONGODB_URL, NATS_URL, REDIS_URL};
use quckchat_runtime::ephemeral::RedisPool;
use quckchat_runtime::process::{self, Node};
use quckchat_runtime::publish::Publisher;

/// jemalloc, not the system allocator: a message's path allocates a lot, and
/// glibc's malloc cost ~1.35× in throughput (bench/ANALYSIS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let config = process::start("push-svc", PushConfig::read);
    process::finish("push-svc", run(config).await);
}

async fn run(config: PushConfig) -> anyhow::Result<()> {
    let node = Node::connect("push-svc", &config.server, &config.bus, &config.grpc_token).await?;
    let apps = Arc::new(apps::build(&config.settings.apps)?);
    let devices: Arc<dyn Devices> = Arc::new(
        MongoDevices::connect(&config.mongodb_url)
            .await
            .map_err(|e| anyhow::anyhow!("{MONGODB_URL}: {e}"))?,
    );
    let redis = RedisPool::connect(&config.redis_url, &config.redis_key_prefix)
        .await
        .map_err(|e| anyhow::anyhow!("{REDIS_URL}: {e}"))?;
    let online = GrpcOnline::new(&config.presence_grpc_url, node.grpc_token())
        .map_err(|e| anyhow::anyhow!("{PRESENCE_GRPC_URL}: {e}"))?;
    let chat = GrpcChat::new(&config.chat_grpc_url, node.grpc_token())
        .map_err(|e| anyhow::anyhow!("{CHAT_GRPC_URL}: {e}"))?;
    let settings = &config.settings;
    let deliverer = Arc::new(Deliverer::new(
        apps.clone(),
        devices.clone(),
        Arc::new(RedisSentLog::new(redis.clone())),
        RetryPolicy {
            max_attempts: settings.max_attempts,
            ..RetryPolicy::default()
        },
        settings.concurrency,
    ));
    let service = Arc::new(PushService::new(
        devices.clone(),
        Arc::new(online),
        Arc::new(chat),
        deliverer,
        settings.preview,
    ));
    let mut workers = Vec::new();
    if apps.is_empty() {
        tracing::warn!("no FCM or APNS credentials: push is off (the device registry still works)");
    } else {
        tracing::info!(apps = ?apps.names(), "push on");
        // JetStream needs the client itself: a connection of its own.
        let nats = NatsBus::connect(
            &config.bus.nats_url,
            &format!("{}-jetstream", config.server.node_name),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{NATS_URL}: {e}"))?;
        let consumer = queue::jetstream_consumer(nats.client(), node.subjects(), settings.queue)
            .await
            .map_err(|e| anyhow::anyhow!("{NATS_URL}: {e}"))?;
        let (shutdown, drain, queue_settings) = (node.shutdown(), node.drain(), settings.queue);
        let service = service.clone();
        workers.push(tokio::spawn(async move {
            queue::run_jetstream(service, consumer, queue_settings, shutdown, drain).await;
        }));
    }
    let checks = vec![
        health_check("redis", redis, |r| Box::pin(r.ping())),
        health_check("store", devices.clone(), |d| d.ping()),
    ];
    let publisher = Publisher::new(node.bus(), node.subjects().clone());
    let sending = !apps.is_empty();
    let grpc = tonic::service::Routes::new(PushGrpc::server(devices, publisher, sending));
    node.serve(checks, grpc, workers).await
}
