//! Huddle configuration.

use std::time::Duration;

use quckchat_runtime::config::{
    BusConfig, ConfigError, ConfigReader, ServerConfig, MONGODB_URL, REDIS_URL,
};
use quckchat_runtime::grpc::GrpcToken;
use quckchat_signaling::config::SignalingSettings;
use quckchat_signaling::ice::IceConfig;

pub const HUDDLE_MAX_PARTICIPANTS: &str = "HUDDLE_MAX_PARTICIPANTS";
pub const HUDDLE_GRACE_SECS: &str = "HUDDLE_GRACE_SECS";
pub const HUDDLE_AUDIT_SECS: &str = "HUDDLE_AUDIT_SECS";
pub const REDIS_KEY_PREFIX: &str = "REDIS_KEY_PREFIX";
pub const CHAT_GRPC_URL: &str = "CHAT_GRPC_URL";

/// Most participants `HUDDLE_MAX_PARTICIPANTS` may allow: every device
/// sends to every other (mesh), so rooms stay small.
pub const MAX_PARTICIPANTS_LIMIT: usize = 50;

/// What huddles need in both modes.
#[derive(Debug, Clone)]
pub struct HuddleSettings {
    /// Devices in one huddle at most (default 8).
    pub max_participants: usize,
    /// A participant whose socket left stays this long (default 3 s): a
    /// reconnect within it shows no leave and join.
    pub grace: Duration,
    /// How often live participants' sockets are checked with their gateway
    /// (default 4 s): a closed socket's participant is away after at most
    /// this, a dead gateway's after two audits; they leave one grace later.
    pub audit_every: Duration,
    /// The ICE servers joiners get (signaling's `STUN_*`/`TURN_*`).
    pub ice: IceConfig,
}

impl HuddleSettings {
    /// Reads the huddle variables; `ice` is what signaling read (the
    /// all-in-one server reads those variables once).
    pub fn read(r: &mut ConfigReader<'_>, ice: IceConfig) -> Result<Self, ConfigError> {
        let max = r.positive(HUDDLE_MAX_PARTICIPANTS, 8usize)?;
        if max > MAX_PARTICIPANTS_LIMIT {
            return Err(ConfigError::new(
                HUDDLE_MAX_PARTICIPANTS,
                format!(
                    "at most {MAX_PARTICIPANTS_LIMIT} (a mesh: every device sends to every other)"
                ),
            ));
        }
        Ok(Self {
            max_participants: max,
            grace: r.secs(HUDDLE_GRACE_SECS, 3)?,
            audit_every: Duration::from_secs(r.positive(HUDDLE_AUDIT_SECS, 4u64)?),
            ice,
        })
    }

    /// How long after its gateway dies a participant is gone at most: two
    /// unanswered audits, the grace, one sweep.
    pub fn ghost_bound(&self) -> Duration {
        self.audit_every * 2 + self.grace + crate::service::SWEEP_EVERY
    }
}

/// huddle-svc (distributed mode).
#[derive(Debug, Clone)]
pub struct HuddleConfig {
    /// Admin HTTP and gRPC (default 4004).
    pub server: ServerConfig,
    pub bus: BusConfig,
    pub redis_url: String,
    pub redis_key_prefix: String,
    pub mongodb_url: String,
    /// chat-svc's replicas (comma-separated): conversation members.
    pub chat_grpc_url: String,
    pub settings: HuddleSettings,
    /// `GRPC_AUTH_TOKEN` (required).
    pub grpc_token: GrpcToken,
}

impl HuddleConfig {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::read(r, 4004)?,
            bus: BusConfig::read(r)?,
            redis_url: r.url(REDIS_URL, "redis://localhost:6379", &["redis", "rediss"])?,
            redis_key_prefix: r.string(REDIS_KEY_PREFIX, "qc"),
            mongodb_url: r.url(
                MONGODB_URL,
                "mongodb://localhost:27017/quckchat",
                &["mongodb", "mongodb+srv"],
            )?,
            chat_grpc_url: r.url_list(
                CHAT_GRPC_URL,
                "http://127.0.0.1:4001",
                &["http", "https"],
            )?,
            settings: {
                let ice = SignalingSettings::read(r)?.ice;
                HuddleSettings::read(r, ice)?
            },
            grpc_token: GrpcToken::read_required(r)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<HuddleSettings, ConfigError> {
        let env: HashMap<&str, &str> = vars.iter().copied().collect();
        let mut r = ConfigReader::new(&env);
        let ice = SignalingSettings::read(&mut r)?.ice;
        HuddleSettings::read(&mut r, ice)
    }

    #[test]
    fn defaults_and_limits() {
        let s = read(&[]).unwrap();
        assert_eq!(s.max_participants, 8);
        assert_eq!(s.grace, Duration::from_secs(3));
        assert_eq!(s.audit_every, Duration::from_secs(4));
        assert!(
            s.ghost_bound() <= Duration::from_secs(15),
            "{:?}",
            s.ghost_bound()
        );
        assert_eq!(
            read(&[(HUDDLE_MAX_PARTICIPANTS, "12")])
                .unwrap()
                .max_participants,
            12
        );
        for bad in ["0", "51", "x"] {
            let err = read(&[(HUDDLE_MAX_PARTICIPANTS, bad)]).unwrap_err();
            assert!(err.to_string().contains(HUDDLE_MAX_PARTICIPANTS), "{err}");
        }
        assert!(read(&[(HUDDLE_AUDIT_SECS, "0")]).is_err());
    }
}
