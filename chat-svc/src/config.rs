//! chat-svc configuration (distributed mode).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use quckchat_runtime::config::{
    BusConfig, ConfigError, ConfigReader, ServerConfig, DATA_DIR, MONGODB_URL,
};
use quckchat_runtime::grpc::GrpcToken;

pub const PRESENCE_GRPC_URL: &str = "PRESENCE_GRPC_URL";
pub const CHAT_STORE: &str = "CHAT_STORE";

/// Where chat-svc keeps conversations and messages (`CHAT_STORE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `mongodb` (the default): `MONGODB_URL`; any number of replicas.
    Mongo { url: String },
    /// `embedded`: the all-in-one SQLite store under `DATA_DIR`, for one
    /// chat-svc replica that owns that directory (a single-node deployment,
    /// or a bench whose joins the test MongoDB would bound).
    Embedded { data_dir: PathBuf },
}

/// The value of `CHAT_STORE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Mongo,
    Embedded,
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mongodb" => Ok(Self::Mongo),
            "embedded" => Ok(Self::Embedded),
            _ => Err("expected `mongodb` or `embedded`".into()),
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mongo => "mongodb",
            Self::Embedded => "embedded",
        })
    }
}

#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Admin HTTP and gRPC, on one port (default 4001).
    pub server: ServerConfig,
    pub bus: BusConfig,
    pub store: StoreConfig,
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
            store: match r.parse(CHAT_STORE, StoreKind::Mongo)? {
                StoreKind::Mongo => StoreConfig::Mongo {
                    url: r.url(
                        MONGODB_URL,
                        "mongodb://localhost:27017/quckchat",
                        &["mongodb", "mongodb+srv"],
                    )?,
                },
                StoreKind::Embedded => StoreConfig::Embedded {
                    data_dir: PathBuf::from(r.string(DATA_DIR, "./data")),
                },
            },
            presence_grpc_url: r.optional(PRESENCE_GRPC_URL),
            grpc_token: GrpcToken::read_required(r)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<ChatConfig, ConfigError> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .chain([(
                "GRPC_AUTH_TOKEN".to_owned(),
                "a-token-of-16-chars-or-more".to_owned(),
            )])
            .collect();
        ChatConfig::read(&mut ConfigReader::new(&env))
    }

    #[test]
    fn the_store_is_mongodb_unless_embedded_is_asked_for() {
        let c = read(&[("MONGODB_URL", "mongodb://db:27017/chat")]).unwrap();
        assert_eq!(
            c.store,
            StoreConfig::Mongo {
                url: "mongodb://db:27017/chat".into()
            }
        );
        let c = read(&[("CHAT_STORE", "embedded"), ("DATA_DIR", "/var/lib/qc")]).unwrap();
        assert_eq!(
            c.store,
            StoreConfig::Embedded {
                data_dir: "/var/lib/qc".into()
            }
        );
        let err = read(&[("CHAT_STORE", "sqlite")]).unwrap_err();
        assert_eq!(err.key, CHAT_STORE);
    }
}
