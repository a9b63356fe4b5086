//! The all-in-one QuckChat server: the gateway and every service in one
//! process, over the in-process bus, with the embedded store under
//! `DATA_DIR`. The same service code runs distributed over NATS and MongoDB;
//! only the three seams (bus, store, ephemeral state) differ.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use quckchat_chat::commands;
use quckchat_chat::grpc::ChatGrpc;
use quckchat_chat::presence::GrpcPresence;
use quckchat_chat::service::ChatService;
use quckchat_chat::store::{ChatStore, EmbeddedStore};
use quckchat_gateway::{Gateway, GatewayConfig};
use quckchat_huddle::config::HuddleSettings;
use quckchat_huddle::grpc::HuddleGrpc;
use quckchat_huddle::service::HuddleService;
use quckchat_huddle::state::MemoryRoomState;
use quckchat_huddle::store::{EmbeddedHuddleStore, HuddleStore};
use quckchat_presence::config::PresenceTiming;
use quckchat_presence::grpc::PresenceGrpc;
use quckchat_presence::service::{Memberships, PresenceService};
use quckchat_presence::state::{MemoryState, PresenceState};
use quckchat_push::clients::{GrpcChat, GrpcOnline};
use quckchat_push::config::PushSettings;
use quckchat_push::deliver::{Deliverer, RetryPolicy};
use quckchat_push::devices::{Devices, EmbeddedDevices};
use quckchat_push::grpc::PushGrpc;
use quckchat_push::queue as push_queue;
use quckchat_push::sent::MemorySentLog;
use quckchat_push::service::PushService;
use quckchat_runtime::admin::{self, BusHealth, Health};
use quckchat_runtime::auth::DEV_JWT_SECRET;
use quckchat_runtime::bus::{Bus, MemoryBus, Subjects};
use quckchat_runtime::config::{ConfigError, ConfigReader, DATA_DIR};
use quckchat_runtime::dashboard::{self, Scope};
use quckchat_runtime::grpc::{CallError, GrpcToken};
use quckchat_runtime::presence::MAX_PRESENCE_MEMBERS;
use quckchat_runtime::publish::Publisher;
use quckchat_runtime::routes;
use quckchat_runtime::server;
use quckchat_signaling::chat::GrpcConversations;
use quckchat_signaling::config::SignalingSettings;
use quckchat_signaling::grpc::SignalingGrpc;
use quckchat_signaling::huddles::GrpcHuddles;
use quckchat_signaling::log::{CallLog, EmbeddedCallLog};
use quckchat_signaling::service::SignalingService;
use quckchat_signaling::state::MemoryCallState;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Configuration of the all-in-one server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub gateway: GatewayConfig,
    pub presence: PresenceTiming,
    pub signaling: SignalingSettings,
    pub huddles: HuddleSettings,
    pub push: PushSettings,
    /// Where the embedded store keeps its file.
    pub data_dir: PathBuf,
    /// `GRPC_AUTH_TOKEN`: what gRPC callers must present. Unset: a random
    /// token only this process's own services know, so gRPC on this port
    /// answers no one else (outside callers need `GRPC_AUTH_TOKEN` set).
    pub grpc_token: Option<GrpcToken>,
}

impl ServeConfig {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        let huddles;
        Ok(Self {
            gateway: GatewayConfig::read(r, Some(DEV_JWT_SECRET))?,
            presence: PresenceTiming::read(r)?,
            signaling: {
                let signaling = SignalingSettings::read(r)?;
                huddles = HuddleSettings::read(r, signaling.ice.clone())?;
                signaling
            },
            huddles,
            push: PushSettings::read(r)?,
            data_dir: PathBuf::from(r.string(DATA_DIR, "./data")),
            grpc_token: GrpcToken::read_optional(r)?,
        })
    }
}

/// A token cancelled by SIGTERM/SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    quckchat_runtime::shutdown::cancel_on_signal(token.clone());
    token
}

/// Binds `PORT` and runs until `shutdown` is cancelled.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = server::bind(config.gateway.server.listen_addr()).await?;
    run(config, listener, shutdown.cancelled_owned()).await
}

/// Runs the server on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    {
        let token = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
    }
    // Services call each other over real gRPC, here on this server's own port.
    let addr = listener.local_addr()?;
    let loopback = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let self_url = format!("http://{loopback}");
    let grpc_token = match &config.grpc_token {
        Some(token) => token.clone(),
        None => {
            tracing::warn!(
                "GRPC_AUTH_TOKEN is not set: gRPC on this port accepts only this process's own calls \
                 (a random token). Set GRPC_AUTH_TOKEN to call it from the backend or `quckchat conversation`."
            );
            GrpcToken::generate()
        }
    };

    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let store: Arc<dyn ChatStore> = Arc::new(
        EmbeddedStore::open(&config.data_dir).map_err(|e| anyhow::anyhow!("DATA_DIR: {e}"))?,
    );
    let subjects = Subjects::new(config.gateway.bus.subject_prefix.clone());
    let drain = config.gateway.server.drain;
    // Services keep answering while sockets drain; they stop after.
    let services_stop = CancellationToken::new();

    let presence_state: Arc<dyn PresenceState> = Arc::new(MemoryState::new());
    let memberships = Arc::new(StoreMemberships(store.clone()));
    let presence = Arc::new(PresenceService::new(
        presence_state.clone(),
        bus.clone(),
        subjects.clone(),
        memberships,
        config.presence,
    ));
    let presence_worker = presence.start(services_stop.clone(), drain).await?;

    let chat = ChatService::new(store.clone(), bus.clone(), subjects.clone()).with_presence(
        Arc::new(GrpcPresence::new(&self_url, &grpc_token).map_err(anyhow::Error::msg)?),
    );
    let chat = Arc::new(chat);
    let chat_consumer = commands::serve(
        chat.clone(),
        bus.clone(),
        &subjects,
        services_stop.clone(),
        drain,
    )
    .await?;

    let call_log: Arc<dyn CallLog> = Arc::new(
        EmbeddedCallLog::open(&config.data_dir).map_err(|e| anyhow::anyhow!("DATA_DIR: {e}"))?,
    );
    let signaling = Arc::new(
        SignalingService::new(
            Arc::new(MemoryCallState::new()),
            call_log.clone(),
            bus.clone(),
            subjects.clone(),
            config.signaling.ice.clone(),
            config.signaling.timing,
        )
        .with_chat(Arc::new(
            GrpcConversations::new(&self_url, &grpc_token).map_err(anyhow::Error::msg)?,
        ))
        .with_huddles(Arc::new(
            GrpcHuddles::new(&self_url, &grpc_token).map_err(anyhow::Error::msg)?,
        )),
    );
    let signaling_worker = signaling
        .clone()
        .start(services_stop.clone(), drain)
        .await?;

    let huddle_store: Arc<dyn HuddleStore> = Arc::new(
        EmbeddedHuddleStore::open(&config.data_dir)
            .map_err(|e| anyhow::anyhow!("DATA_DIR: {e}"))?,
    );
    let huddles = Arc::new(
        HuddleService::new(
            huddle_store.clone(),
            Arc::new(MemoryRoomState::new()),
            bus.clone(),
            subjects.clone(),
            config.huddles.clone(),
        )
        .with_chat(Arc::new(
            GrpcConversations::new(&self_url, &grpc_token).map_err(anyhow::Error::msg)?,
        )),
    );
    let huddle_worker = huddles.clone().start(services_stop.clone(), drain).await?;

    let push_devices: Arc<dyn Devices> = Arc::new(
        EmbeddedDevices::open(&config.data_dir).map_err(|e| anyhow::anyhow!("DATA_DIR: {e}"))?,
    );
    let push_apps = Arc::new(quckchat_push::apps::build(&config.push.apps)?);
    let push_sending = !push_apps.is_empty();
    let push_worker = if push_apps.is_empty() {
        tracing::info!("no FCM or APNS credentials: push is off (the device registry still works)");
        None
    } else {
        tracing::info!(apps = ?push_apps.names(), "push on");
        let deliverer = Arc::new(Deliverer::new(
            push_apps,
            push_devices.clone(),
            Arc::new(MemorySentLog::new()),
            RetryPolicy {
                max_attempts: config.push.max_attempts,
                ..RetryPolicy::default()
            },
            config.push.concurrency,
        ));
        let push = Arc::new(PushService::new(
            push_devices.clone(),
            Arc::new(GrpcOnline::new(&self_url, &grpc_token).map_err(anyhow::Error::msg)?),
            Arc::new(GrpcChat::new(&self_url, &grpc_token).map_err(anyhow::Error::msg)?),
            deliverer,
            config.push.preview,
        ));
        Some(
            push_queue::run_memory(
                push,
                bus.clone(),
                &subjects,
                config.push.queue,
                services_stop.clone(),
                drain,
            )
            .await?,
        )
    };

    let health = Health::new(
        config.gateway.server.node_name.clone(),
        vec![
            Arc::new(BusHealth(bus.clone())),
            admin::health_check("store", store, |s| s.ping()),
            admin::health_check("calls", call_log, |l| l.ping()),
            admin::health_check("huddles", huddle_store, |s| s.ping()),
            admin::health_check("devices", push_devices.clone(), |d| d.ping()),
        ],
    );
    let gateway = Gateway::new(config.gateway.clone(), bus.clone(), token.clone());
    let grpc = quckchat_runtime::grpc::authenticated(
        tonic::service::Routes::new(ChatGrpc::server(chat))
            .add_service(PresenceGrpc::server(presence_state))
            .add_service(SignalingGrpc::server(signaling))
            .add_service(HuddleGrpc::server(huddles))
            .add_service(PushGrpc::server(
                push_devices,
                Publisher::new(bus.clone(), subjects.clone()),
                push_sending,
            )),
        &grpc_token,
    );
    let router = gateway
        .router()
        .merge(admin::router(health.clone()))
        .merge(dashboard::router(
            config.gateway.dashboard.clone(),
            health.clone(),
            Scope::AllInOne,
        ))
        .merge(grpc);
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "quckchat listening (all-in-one)");
    server::serve_with_health_limited(
        listener,
        router,
        token.clone(),
        health.clone(),
        config.gateway.connections,
        // Sockets close over the drain window while the port answers 503.
        {
            let gateway = gateway.clone();
            async move { gateway.drained(drain).await }
        },
    )
    .await?;
    services_stop.cancel();
    chat_consumer.await?;
    presence_worker.await?;
    signaling_worker.await?;
    huddle_worker.await?;
    if let Some(worker) = push_worker {
        worker.await?;
    }
    tracing::info!("quckchat stopped");
    Ok(())
}

/// Presence's view of chat memberships in the all-in-one: read from the chat
/// store in the same process, a point query per user coming online or going
/// offline. (Distributed, presence-svc asks chat-svc over gRPC and caches
/// the answer: `ChatMemberships`; here a cache would hold ~300 B per
/// connected user for 30 s to save a local query.)
struct StoreMemberships(Arc<dyn ChatStore>);

#[async_trait::async_trait]
impl Memberships for StoreMemberships {
    async fn conversations_of(&self, user_id: &str) -> Result<Arc<Vec<String>>, CallError> {
        let listed = self
            .0
            .conversations_of(user_id)
            .await
            .map_err(|err| CallError {
                service: routes::CHAT,
                code: tonic::Code::Unavailable,
                message: err.to_string(),
            })?;
        Ok(Arc::new(
            listed
                .into_iter()
                .filter(|c| c.members <= MAX_PRESENCE_MEMBERS as u64)
                .map(|c| c.id)
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn presence_sees_the_users_conversations_small_enough_for_per_member_presence() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn ChatStore> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let members = |n: usize| -> Vec<String> { (0..n).map(|i| format!("u{i}")).collect() };
        store
            .upsert_conversation("small", &members(3))
            .await
            .expect("small");
        store
            .upsert_conversation("big", &members(MAX_PRESENCE_MEMBERS + 1))
            .await
            .expect("big");
        store
            .upsert_conversation("other", &["u9".to_owned()])
            .await
            .expect("other");
        let memberships = StoreMemberships(store);
        let of = |user: &'static str| {
            let memberships = &memberships;
            async move {
                let mut ids = (*memberships.conversations_of(user).await.expect("listed")).clone();
                ids.sort();
                ids
            }
        };
        assert_eq!(
            of("u1").await,
            vec!["small"],
            "the big one carries counts only"
        );
        assert_eq!(of("u9").await, vec!["other"]);
        assert!(of("nobody").await.is_empty());
    }
}
