//! chat-svc configuration (distributed mode).

use quckchat_runtime::config::{BusConfig, ConfigError, ConfigReader, ServerConfig, MONGODB_URL};
use quckchat_runtime::grpc::GrpcToken;

pub const PRESENCE_GRPC_URL: &str = "PRESENCE_GRPC_URL";

#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Admin HTTP and gRPC, on one port (default 4001).
    pub server: ServerConfig,
    pub bus: BusConfig,
    pub mongodb_url: String,
    /// presence-svc's gRPC address; unset: joins carry no `presence_state`.
    pub presence_grpc_url: Option<String>,
    /// `GRPC_AUTH_TOKEN` (required): what gRPC callers present, and what
    /// this service presents to presence-svc.
    pub grpc_token: GrpcToken,
}

impl ChatConfig {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::read(r, 4001)?,
            bus: BusConfig::read(r)?,
            mongodb_url: r.url(
                MONGODB_URL,
                "mongodb://localhost:27017/quckchat",
                &["mongodb", "mongodb+srv"],
            )?,
            presence_grpc_url: r.optional(PRESENCE_GRPC_URL),
            grpc_token: GrpcToken::read_required(r)?,
        })
    }
}
