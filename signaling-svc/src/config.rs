//! Signaling configuration: [`SignalingSettings`] in both modes, and
//! [`SignalingConfig`] for the `signaling-svc` binary.

use std::time::Duration;

use quckchat_runtime::config::{
    BusConfig, ConfigError, ConfigReader, ServerConfig, MONGODB_URL, REDIS_URL,
};
use quckchat_runtime::grpc::GrpcToken;

use crate::calls::CallTiming;
use crate::ice::{url_list, IceConfig, TurnAuth};

pub const STUN_SERVER_URL: &str = "STUN_SERVER_URL";
pub const TURN_SERVER_URL: &str = "TURN_SERVER_URL";
pub const TURN_USERNAME: &str = "TURN_USERNAME";
pub const TURN_CREDENTIAL: &str = "TURN_CREDENTIAL";
pub const TURN_SECRET: &str = "TURN_SECRET";
pub const TURN_CREDENTIAL_TTL_SECS: &str = "TURN_CREDENTIAL_TTL_SECS";
pub const CALL_RING_TIMEOUT_SECS: &str = "CALL_RING_TIMEOUT_SECS";
pub const CALL_DISCONNECT_GRACE_SECS: &str = "CALL_DISCONNECT_GRACE_SECS";
pub const REDIS_KEY_PREFIX: &str = "REDIS_KEY_PREFIX";
pub const CHAT_GRPC_URL: &str = "CHAT_GRPC_URL";
pub const HUDDLE_GRPC_URL: &str = "HUDDLE_GRPC_URL";

/// What signaling needs in both modes.
#[derive(Debug, Clone)]
pub struct SignalingSettings {
    pub ice: IceConfig,
    pub timing: CallTiming,
}

impl SignalingSettings {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        let stun = r.string(STUN_SERVER_URL, "stun:stun.l.google.com:19302");
        let turn = r.string(TURN_SERVER_URL, "");
        let username = r.optional(TURN_USERNAME);
        let credential = r.secret(TURN_CREDENTIAL);
        let secret = r.secret(TURN_SECRET);
        let lifetime = r.positive(TURN_CREDENTIAL_TTL_SECS, 86_400u64)?;
        let turn_auth = match (secret, username, credential) {
            (Some(secret), _, _) => Some(TurnAuth::Rest {
                secret,
                lifetime: Duration::from_secs(lifetime),
            }),
            (None, Some(username), Some(credential)) => Some(TurnAuth::Static {
                username,
                credential,
            }),
            (None, None, None) => None,
            (None, _, _) => {
                return Err(ConfigError::new(
                    TURN_CREDENTIAL,
                    "TURN_USERNAME and TURN_CREDENTIAL go together (or set TURN_SECRET)",
                ))
            }
        };
        let turn_urls = url_list(&turn);
        for url in url_list(&stun).iter().chain(&turn_urls) {
            let scheme = url.split(':').next().unwrap_or_default();
            if !["stun", "stuns", "turn", "turns"].contains(&scheme) {
                return Err(ConfigError::new(
                    if turn_urls.contains(url) {
                        TURN_SERVER_URL
                    } else {
                        STUN_SERVER_URL
                    },
                    format!("{url:?} is not a stun:, stuns:, turn: or turns: URL"),
                ));
            }
        }
        Ok(Self {
            ice: IceConfig {
                stun_urls: url_list(&stun),
                turn_urls,
                turn_auth,
            },
            timing: CallTiming {
                ring_timeout: Duration::from_secs(r.positive(CALL_RING_TIMEOUT_SECS, 45u64)?),
                disconnect_grace: r.secs(CALL_DISCONNECT_GRACE_SECS, 20)?,
            },
        })
    }
}

/// signaling-svc (distributed mode).
#[derive(Debug, Clone)]
pub struct SignalingConfig {
    /// Admin HTTP and gRPC (default 4003).
    pub server: ServerConfig,
    pub bus: BusConfig,
    pub redis_url: String,
    pub redis_key_prefix: String,
    pub mongodb_url: String,
    /// chat-svc's replicas (comma-separated): conversation members (calls
    /// that name a conversation) and the call's message in it.
    pub chat_grpc_url: String,
    /// huddle-svc's replicas (comma-separated): `call:escalate`.
    pub huddle_grpc_url: String,
    pub settings: SignalingSettings,
    /// `GRPC_AUTH_TOKEN` (required).
    pub grpc_token: GrpcToken,
}

impl SignalingConfig {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::read(r, 4003)?,
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
            huddle_grpc_url: r.url_list(
                HUDDLE_GRPC_URL,
                "http://127.0.0.1:4004",
                &["http", "https"],
            )?,
            settings: SignalingSettings::read(r)?,
            grpc_token: GrpcToken::read_required(r)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<SignalingSettings, ConfigError> {
        let env: HashMap<&str, &str> = vars.iter().copied().collect();
        SignalingSettings::read(&mut ConfigReader::new(&env))
    }

    #[test]
    fn defaults_and_turn_modes() {
        let s = read(&[]).unwrap();
        assert_eq!(s.ice.stun_urls, vec!["stun:stun.l.google.com:19302"]);
        assert!(s.ice.turn_urls.is_empty() && s.ice.turn_auth.is_none());
        assert_eq!(s.timing.ring_timeout, Duration::from_secs(45));
        let s = read(&[
            (TURN_SERVER_URL, "turn:t:3478"),
            (TURN_SECRET, "s3cret"),
            (TURN_CREDENTIAL_TTL_SECS, "600"),
            (CALL_RING_TIMEOUT_SECS, "3"),
        ])
        .unwrap();
        assert_eq!(
            s.ice.turn_auth,
            Some(TurnAuth::Rest {
                secret: "s3cret".into(),
                lifetime: Duration::from_secs(600)
            })
        );
        assert_eq!(s.timing.ring_timeout, Duration::from_secs(3));
        let err = read(&[(TURN_USERNAME, "u")]).unwrap_err();
        assert!(err.to_string().contains(TURN_CREDENTIAL), "{err}");
        let err = read(&[(TURN_SERVER_URL, "http://t")]).unwrap_err();
        assert!(err.to_string().contains(TURN_SERVER_URL), "{err}");
        assert!(read(&[(CALL_RING_TIMEOUT_SECS, "0")]).is_err());
    }
}
