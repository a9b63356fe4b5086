//! Presence configuration.

use std::time::Duration;

use quckchat_runtime::config::{BusConfig, ConfigError, ConfigReader, ServerConfig, REDIS_URL};
use quckchat_runtime::grpc::GrpcToken;

pub const PRESENCE_GRACE_SECS: &str = "PRESENCE_GRACE_SECS";
pub const PRESENCE_NODE_TTL_SECS: &str = "PRESENCE_NODE_TTL_SECS";
pub const REDIS_KEY_PREFIX: &str = "REDIS_KEY_PREFIX";
pub const CHAT_GRPC_URL: &str = "CHAT_GRPC_URL";

/// Timing of presence, in both modes.
#[derive(Debug, Clone, Copy)]
pub struct PresenceTiming {
    /// A device that reconnects within this window shows no leave/join.
    pub grace: Duration,
    /// A gateway silent this long is dead; its connections are dropped. Keep
    /// it a few gateway heartbeats (`NODE_HEARTBEAT_SECS`, 10 s) long.
    pub node_ttl: Duration,
}

impl PresenceTiming {
    /// A node whose connection count disagrees with presence's is audited
    /// at most this often (a third of the node TTL: 10 s by default).
    pub fn audit_min_gap(&self) -> Duration {
        self.node_ttl / 3
    }

    /// Every node is audited at least this often, counts agreeing or not
    /// (four node TTLs: 2 minutes by default).
    pub fn audit_every(&self) -> Duration {
        self.node_ttl * 4
    }

    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        let grace = r.parse(PRESENCE_GRACE_SECS, 5u64)?;
        Ok(Self {
            grace: Duration::from_secs(grace),
            node_ttl: r.secs(PRESENCE_NODE_TTL_SECS, 30)?,
        })
    }
}

/// presence-svc (distributed mode).
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// Admin HTTP and gRPC (default 4002).
    pub server: ServerConfig,
    pub bus: BusConfig,
    pub redis_url: String,
    pub redis_key_prefix: String,
    pub chat_grpc_url: String,
    pub timing: PresenceTiming,
    /// `GRPC_AUTH_TOKEN` (required): what gRPC callers present, and what
    /// this service presents to chat-svc.
    pub grpc_token: GrpcToken,
}

impl PresenceConfig {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::read(r, 4002)?,
            bus: BusConfig::read(r)?,
            redis_url: r.url(REDIS_URL, "redis://localhost:6379", &["redis", "rediss"])?,
            redis_key_prefix: r.string(REDIS_KEY_PREFIX, "qc"),
            chat_grpc_url: r.url_list(
                CHAT_GRPC_URL,
                "http://127.0.0.1:4001",
                &["http", "https"],
            )?,
            timing: PresenceTiming::read(r)?,
            grpc_token: GrpcToken::read_required(r)?,
        })
    }
}
