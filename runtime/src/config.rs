//! Typed configuration read from the environment.
//!
//! Every process builds its own config struct from a [`ConfigReader`], which
//! reads through the [`Env`] trait (so tests pass a map), records what it used
//! (defaults too) for one start-up log line with secrets masked, and names the
//! offending variable in the error. A binary that gets a [`ConfigError`]
//! prints its one line and exits with [`EXIT_CONFIG`].

use std::collections::HashMap;
use std::fmt::Display;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

/// Exit code for bad or missing configuration (`EX_CONFIG` in sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

pub const PORT: &str = "PORT";
pub const HOST: &str = "HOST";
pub const BIND_ADDRESS: &str = "BIND_ADDRESS";
pub const NODE_NAME: &str = "NODE_NAME";
pub const JWT_SECRET: &str = "JWT_SECRET";
pub const SECRET_KEY_BASE: &str = "SECRET_KEY_BASE";
pub const NATS_URL: &str = "NATS_URL";
pub const NATS_SUBJECT_PREFIX: &str = "NATS_SUBJECT_PREFIX";
pub const MONGODB_URL: &str = "MONGODB_URL";
pub const REDIS_URL: &str = "REDIS_URL";
pub const DATA_DIR: &str = "DATA_DIR";
pub const BACKEND_URL: &str = "BACKEND_URL";
pub const REQUEST_TIMEOUT_MS: &str = "REQUEST_TIMEOUT_MS";
pub const SHUTDOWN_DRAIN_SECS: &str = "SHUTDOWN_DRAIN_SECS";
/// The shared token gRPC callers present (read by [`crate::grpc::GrpcToken`]).
pub const GRPC_AUTH_TOKEN: &str = "GRPC_AUTH_TOKEN";

/// Where configuration values come from.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

impl Env for HashMap<&str, &str> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).map(|v| (*v).to_owned())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: &'static str, reason: impl Into<String>) -> Self {
        Self {
            key,
            reason: reason.into(),
        }
    }
}

/// Reads typed values and remembers what it read.
pub struct ConfigReader<'a> {
    env: &'a dyn Env,
    used: Vec<(&'static str, String)>,
}

impl<'a> ConfigReader<'a> {
    pub fn new(env: &'a dyn Env) -> Self {
        Self {
            env,
            used: Vec::new(),
        }
    }

    fn raw(&self, key: &'static str) -> Option<String> {
        self.env.var(key).filter(|v| !v.trim().is_empty())
    }

    /// A string with a default.
    pub fn string(&mut self, key: &'static str, default: &str) -> String {
        let value = self.raw(key).unwrap_or_else(|| default.to_owned());
        self.used.push((key, value.clone()));
        value
    }

    /// An optional string; absent is recorded as `-`.
    pub fn optional(&mut self, key: &'static str) -> Option<String> {
        let value = self.raw(key);
        self.used
            .push((key, value.clone().unwrap_or_else(|| "-".into())));
        value
    }

    /// A secret: logged masked.
    pub fn secret(&mut self, key: &'static str) -> Option<String> {
        let value = self.raw(key);
        let shown = match &value {
            Some(_) => "******".to_owned(),
            None => "-".to_owned(),
        };
        self.used.push((key, shown));
        value
    }

    /// A value parsed with `FromStr`, with a default.
    pub fn parse<T>(&mut self, key: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr + Display,
        T::Err: Display,
    {
        let value = match self.raw(key) {
            Some(raw) => raw
                .trim()
                .parse::<T>()
                .map_err(|e| ConfigError::new(key, format!("{raw:?}: {e}")))?,
            None => default,
        };
        self.used.push((key, value.to_string()));
        Ok(value)
    }

    /// A count that must be at least 1.
    pub fn positive<T>(&mut self, key: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr + Display + PartialEq + From<u8>,
        T::Err: Display,
    {
        let v = self.parse(key, default)?;
        if v == T::from(0) {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
        Ok(v)
    }

    /// A positive number of seconds.
    pub fn secs(&mut self, key: &'static str, default: u64) -> Result<Duration, ConfigError> {
        let v: u64 = self.parse(key, default)?;
        if v == 0 {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
        Ok(Duration::from_secs(v))
    }

    /// A positive number of milliseconds.
    pub fn millis(&mut self, key: &'static str, default: u64) -> Result<Duration, ConfigError> {
        let v: u64 = self.parse(key, default)?;
        if v == 0 {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
        Ok(Duration::from_millis(v))
    }

    /// A URL-ish value that must start with one of `schemes`. Credentials in
    /// it are masked in the log.
    pub fn url(
        &mut self,
        key: &'static str,
        default: &str,
        schemes: &[&str],
    ) -> Result<String, ConfigError> {
        let value = self.raw(key).unwrap_or_else(|| default.to_owned());
        if !schemes
            .iter()
            .any(|s| value.starts_with(&format!("{s}://")))
        {
            return Err(ConfigError::new(
                key,
                format!(
                    "{value:?} must start with {}",
                    schemes.join("://, ") + "://"
                ),
            ));
        }
        self.used.push((key, mask_url_password(&value)));
        Ok(value)
    }

    /// Comma-separated URLs, each starting with one of `schemes` (the
    /// replicas of a service, [`crate::grpc::Replicas`]).
    pub fn url_list(
        &mut self,
        key: &'static str,
        default: &str,
        schemes: &[&str],
    ) -> Result<String, ConfigError> {
        let value = self.raw(key).unwrap_or_else(|| default.to_owned());
        let urls: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(ConfigError::new(key, "must name at least one URL"));
        }
        for url in &urls {
            if !schemes.iter().any(|s| url.starts_with(&format!("{s}://"))) {
                return Err(ConfigError::new(
                    key,
                    format!("{url:?} must start with {}", schemes.join("://, ") + "://"),
                ));
            }
        }
        let masked: Vec<String> = urls.iter().map(|u| mask_url_password(u)).collect();
        self.used.push((key, masked.join(",")));
        Ok(urls.join(","))
    }

    /// What was read, as `KEY=value` pairs, secrets masked.
    pub fn summary(&self) -> String {
        self.used
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Logs what was read at info level.
    pub fn log(&self, process: &str) {
        tracing::info!(process, config = %self.summary(), "configuration");
    }
}

/// Settings every process has: where it listens and who it is.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind_address: IpAddr,
    pub port: u16,
    /// Public host name (kept from the Phoenix server; used in logs only).
    pub host: String,
    /// This node's name; also the gateway's id on the bus.
    pub node_name: String,
    /// How long SIGTERM waits for sockets and requests to drain.
    pub drain: Duration,
}

impl ServerConfig {
    pub fn read(r: &mut ConfigReader<'_>, default_port: u16) -> Result<Self, ConfigError> {
        Ok(Self {
            bind_address: r.parse(BIND_ADDRESS, IpAddr::from([0, 0, 0, 0]))?,
            port: r.parse(PORT, default_port)?,
            host: r.string(HOST, "localhost"),
            node_name: r.string(NODE_NAME, &default_node_name()),
            drain: r.secs(SHUTDOWN_DRAIN_SECS, 10)?,
        })
    }

    pub fn listen_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.bind_address, self.port)
    }
}

fn default_node_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("realtime@{host}")
}

/// How a process reaches the bus.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub nats_url: String,
    pub subject_prefix: String,
    /// How long a gateway waits for a service's reply.
    pub request_timeout: Duration,
}

impl BusConfig {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        let nats_url = r.url(
            NATS_URL,
            "nats://127.0.0.1:4222",
            &["nats", "tls", "ws", "wss"],
        )?;
        let subject_prefix = r.string(NATS_SUBJECT_PREFIX, "qc");
        let valid = !subject_prefix.is_empty()
            && subject_prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
        if !valid {
            return Err(ConfigError::new(
                NATS_SUBJECT_PREFIX,
                format!("{subject_prefix:?} must be dot-separated tokens of [A-Za-z0-9_-]"),
            ));
        }
        Ok(Self {
            nats_url,
            subject_prefix,
            request_timeout: r.millis(REQUEST_TIMEOUT_MS, 5000)?,
        })
    }
}

fn mask_url_password(url: &str) -> String {
    // scheme://user:password@host → scheme://user:******@host
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_owned();
    };
    let creds = &rest[..at];
    match creds.find(':') {
        Some(colon) => format!(
            "{}{}:******{}",
            &url[..scheme_end + 3],
            &creds[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Prints a configuration error as one line, named for the process, and
/// exits with [`EXIT_CONFIG`].
pub fn exit_on_config_error(process: &str, err: &ConfigError) -> ! {
    eprintln!("{process}: {err}");
    std::process::exit(EXIT_CONFIG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let env: HashMap<&str, &str> =
            HashMap::from([(PORT, "4100"), (NATS_SUBJECT_PREFIX, "t1.x")]);
        let mut r = ConfigReader::new(&env);
        let s = ServerConfig::read(&mut r, 4000).unwrap();
        let b = BusConfig::read(&mut r).unwrap();
        assert_eq!(s.port, 4100);
        assert_eq!(s.bind_address.to_string(), "0.0.0.0");
        assert_eq!(b.subject_prefix, "t1.x");
        assert_eq!(b.nats_url, "nats://127.0.0.1:4222");
        assert!(r.summary().contains("PORT=4100"));
    }

    #[test]
    fn bad_value_names_the_key() {
        let env: HashMap<&str, &str> = HashMap::from([(PORT, "forty")]);
        let err = ServerConfig::read(&mut ConfigReader::new(&env), 4000).unwrap_err();
        assert_eq!(err.key, PORT);
        assert!(err.to_string().starts_with("invalid configuration: PORT:"));

        let env: HashMap<&str, &str> = HashMap::from([(NATS_SUBJECT_PREFIX, "a..b")]);
        let err = BusConfig::read(&mut ConfigReader::new(&env)).unwrap_err();
        assert_eq!(err.key, NATS_SUBJECT_PREFIX);

        let env: HashMap<&str, &str> = HashMap::from([(NATS_URL, "http://x")]);
        assert_eq!(
            BusConfig::read(&mut ConfigReader::new(&env))
                .unwrap_err()
                .key,
            NATS_URL
        );
    }

    #[test]
    fn secrets_are_masked() {
        let env: HashMap<&str, &str> =
            HashMap::from([(JWT_SECRET, "hunter2"), (NATS_URL, "nats://u:pw@h:4222")]);
        let mut r = ConfigReader::new(&env);
        assert_eq!(r.secret(JWT_SECRET).as_deref(), Some("hunter2"));
        BusConfig::read(&mut r).unwrap();
        let s = r.summary();
        assert!(!s.contains("hunter2") && !s.contains("pw@"), "{s}");
        assert!(
            s.contains("JWT_SECRET=******") && s.contains("nats://u:******@h:4222"),
            "{s}"
        );
    }

    #[test]
    fn url_lists_check_each_address() {
        let env: HashMap<&str, &str> =
            HashMap::from([("CHAT_GRPC_URL", " http://a:4001 ,https://u:pw@b:4001,")]);
        let mut r = ConfigReader::new(&env);
        let urls = r
            .url_list("CHAT_GRPC_URL", "http://x:1", &["http", "https"])
            .unwrap();
        assert_eq!(urls, "http://a:4001,https://u:pw@b:4001");
        assert!(
            r.summary().contains("https://u:******@b:4001"),
            "{}",
            r.summary()
        );
        let empty = HashMap::<&str, &str>::new();
        let mut r = ConfigReader::new(&empty);
        assert_eq!(
            r.url_list("CHAT_GRPC_URL", "http://x:1", &["http"])
                .unwrap(),
            "http://x:1"
        );
        for bad in ["http://a:1,ftp://b", ",", "a:1"] {
            let env: HashMap<&str, &str> = HashMap::from([("CHAT_GRPC_URL", bad)]);
            let err = ConfigReader::new(&env)
                .url_list("CHAT_GRPC_URL", "http://x:1", &["http"])
                .unwrap_err();
            assert_eq!(err.key, "CHAT_GRPC_URL", "{bad}");
        }
    }
}
