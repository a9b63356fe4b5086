//! Gateway configuration.

use std::time::Duration;

use quckchat_runtime::config::{
    BusConfig, ConfigError, ConfigReader, ServerConfig, JWT_SECRET, SECRET_KEY_BASE,
};
use quckchat_runtime::dashboard::DashboardConfig;
use quckchat_runtime::server::ServeLimits;

pub use crate::admission::{
    AdmissionConfig, CHECK_ORIGIN, MAX_CONNECTIONS_PER_IP, MAX_SOCKETS_PER_USER, TRUSTED_PROXIES,
};
pub use quckchat_runtime::server::{HEADER_READ_TIMEOUT_SECS, MAX_CONNECTIONS};

pub const SOCKET_IDLE_TIMEOUT_SECS: &str = "SOCKET_IDLE_TIMEOUT_SECS";
pub const MAX_FRAME_BYTES: &str = "MAX_FRAME_BYTES";
pub const SOCKET_RATE_LIMIT_PER_SEC: &str = "SOCKET_RATE_LIMIT_PER_SEC";
pub const SOCKET_CONTROL_RATE_PER_SEC: &str = "SOCKET_CONTROL_RATE_PER_SEC";
pub const SOCKET_OUTBOUND_QUEUE: &str = "SOCKET_OUTBOUND_QUEUE";
pub const SOCKET_MAX_CHANNELS: &str = "SOCKET_MAX_CHANNELS";
pub const SOCKET_MALFORMED_LIMIT: &str = "SOCKET_MALFORMED_LIMIT";
pub const SOCKET_WRITE_TIMEOUT_SECS: &str = "SOCKET_WRITE_TIMEOUT_SECS";
pub const NODE_HEARTBEAT_SECS: &str = "NODE_HEARTBEAT_SECS";
pub const SOCKET_READ_BUFFER_BYTES: &str = "SOCKET_READ_BUFFER_BYTES";

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub server: ServerConfig,
    pub bus: BusConfig,
    pub jwt_secret: String,
    pub socket: SocketConfig,
    /// How often this gateway tells presence it is alive; presence drops the
    /// connections of a gateway silent for its node TTL (default 30 s).
    pub node_heartbeat: Duration,
    /// Who may open a socket: origin, sockets per address and per user.
    pub admission: AdmissionConfig,
    /// Connections of the listener: header-read timeout and global cap.
    pub connections: ServeLimits,
    /// `/dev/dashboard` (`DASHBOARD_ENABLED`, `DASHBOARD_TOKEN`): on by
    /// default all-in-one, off by default in a distributed gateway.
    pub dashboard: DashboardConfig,
}

/// Limits of one client socket.
#[derive(Debug, Clone)]
pub struct SocketConfig {
    /// A socket that sends nothing for this long is closed (clients
    /// heartbeat every 30 s).
    pub idle_timeout: Duration,
    /// Largest frame answered normally. Frames up to 4× this get a
    /// `payload too large` error reply; larger ones close the socket (1009).
    pub max_frame_bytes: usize,
    /// Sustained pushes per second; bursts up to twice that.
    pub rate_per_sec: u32,
    /// Control frames (WebSocket pings/pongs, Phoenix heartbeats) per second;
    /// bursts up to twice that; past it the socket is closed (1008).
    pub control_rate_per_sec: u32,
    /// Frames queued for a socket before it counts as a slow consumer and is
    /// closed with 1013 (it reconnects and recovers with `lastSeq`).
    pub outbound_queue: usize,
    /// Channels one socket may have joined at once.
    pub max_channels: usize,
    /// Unusable frames tolerated per minute before closing with 1008.
    pub malformed_limit: u32,
    /// A write that cannot complete this long means the client stopped
    /// reading: the socket is dropped.
    pub write_timeout: Duration,
    /// Most bytes read from a socket at once, into its worker thread's
    /// read buffer (64 KiB, shared by the thread's sockets: a socket keeps
    /// only the bytes it has not parsed yet, nothing while idle).
    pub read_buffer: usize,
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            max_frame_bytes: 64 * 1024,
            rate_per_sec: 50,
            control_rate_per_sec: crate::limits::CONTROL_RATE_PER_SEC,
            outbound_queue: 1024,
            max_channels: 100,
            malformed_limit: 20,
            write_timeout: Duration::from_secs(10),
            read_buffer: 64 * 1024,
        }
    }
}

impl SocketConfig {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            idle_timeout: r.secs(SOCKET_IDLE_TIMEOUT_SECS, d.idle_timeout.as_secs())?,
            max_frame_bytes: r.positive(MAX_FRAME_BYTES, d.max_frame_bytes)?,
            rate_per_sec: r.positive(SOCKET_RATE_LIMIT_PER_SEC, d.rate_per_sec)?,
            control_rate_per_sec: r
                .positive(SOCKET_CONTROL_RATE_PER_SEC, d.control_rate_per_sec)?,
            outbound_queue: r.positive(SOCKET_OUTBOUND_QUEUE, d.outbound_queue)?,
            max_channels: r.positive(SOCKET_MAX_CHANNELS, d.max_channels)?,
            malformed_limit: r.positive(SOCKET_MALFORMED_LIMIT, d.malformed_limit)?,
            write_timeout: r.secs(SOCKET_WRITE_TIMEOUT_SECS, d.write_timeout.as_secs())?,
            read_buffer: r.positive(SOCKET_READ_BUFFER_BYTES, d.read_buffer)?,
        })
    }
}

impl GatewayConfig {
    /// Reads the gateway's settings. `dev_secret` is the fallback for a missing
    /// `JWT_SECRET` (all-in-one only); without it the secret is required.
    /// The all-in-one (the caller with a `dev_secret`) also serves the
    /// dashboard unless `DASHBOARD_ENABLED=false`; a distributed gateway only
    /// with `DASHBOARD_ENABLED=true`.
    pub fn read(r: &mut ConfigReader<'_>, dev_secret: Option<&str>) -> Result<Self, ConfigError> {
        let server = ServerConfig::read(r, 4000)?;
        let bus = BusConfig::read(r)?;
        let jwt_secret = match (r.secret(JWT_SECRET), dev_secret) {
            (Some(s), _) => s,
            (None, Some(dev)) => dev.to_owned(),
            (None, None) => {
                return Err(ConfigError::new(
                    JWT_SECRET,
                    "required (HS256 secret shared with the backend)",
                ))
            }
        };
        // Kept from the Phoenix server for drop-in env files; QuckChat signs nothing with it.
        let _ = r.secret(SECRET_KEY_BASE);
        Ok(Self {
            admission: AdmissionConfig::read(r, &server.host)?,
            connections: ServeLimits::read(r)?,
            server,
            bus,
            jwt_secret,
            socket: SocketConfig::read(r)?,
            node_heartbeat: r.secs(NODE_HEARTBEAT_SECS, 10)?,
            dashboard: DashboardConfig::read(r, dev_secret.is_some())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn jwt_secret_required_without_dev_fallback() {
        let env: HashMap<&str, &str> = HashMap::new();
        let err = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap_err();
        assert_eq!(err.key, JWT_SECRET);
        let cfg = GatewayConfig::read(&mut ConfigReader::new(&env), Some("dev")).unwrap();
        assert_eq!(cfg.jwt_secret, "dev");
        assert_eq!(cfg.socket.max_frame_bytes, 65536);
    }

    #[test]
    fn dashboard_is_on_all_in_one_and_off_distributed_by_default() {
        use quckchat_runtime::dashboard::{DASHBOARD_ENABLED, DASHBOARD_TOKEN};
        let env: HashMap<&str, &str> = HashMap::from([(JWT_SECRET, "k")]);
        let cfg = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap();
        assert!(!cfg.dashboard.enabled);
        let cfg = GatewayConfig::read(&mut ConfigReader::new(&env), Some("dev")).unwrap();
        assert!(cfg.dashboard.enabled);
        let env: HashMap<&str, &str> = HashMap::from([
            (JWT_SECRET, "k"),
            (DASHBOARD_ENABLED, "true"),
            (DASHBOARD_TOKEN, "0123456789abcdef"),
        ]);
        let cfg = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap();
        assert!(cfg.dashboard.enabled && cfg.dashboard.token.is_some());
        let env: HashMap<&str, &str> =
            HashMap::from([(JWT_SECRET, "k"), (DASHBOARD_TOKEN, "short")]);
        let err = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap_err();
        assert_eq!(err.key, DASHBOARD_TOKEN);
    }

    #[test]
    fn socket_limits_are_validated() {
        let env: HashMap<&str, &str> =
            HashMap::from([(JWT_SECRET, "k"), (SOCKET_RATE_LIMIT_PER_SEC, "0")]);
        let err = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap_err();
        assert_eq!(err.key, SOCKET_RATE_LIMIT_PER_SEC);
        let env: HashMap<&str, &str> =
            HashMap::from([(JWT_SECRET, "k"), (SOCKET_IDLE_TIMEOUT_SECS, "2")]);
        let cfg = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap();
        assert_eq!(cfg.socket.idle_timeout, Duration::from_secs(2));
    }

    #[test]
    fn admission_and_connection_limits() {
        let env: HashMap<&str, &str> = HashMap::from([(JWT_SECRET, "k")]);
        let cfg = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap();
        assert_eq!(
            cfg.admission.max_per_ip,
            AdmissionConfig::DEFAULT_MAX_PER_IP
        );
        assert_eq!(
            cfg.admission.max_per_user,
            AdmissionConfig::DEFAULT_MAX_PER_USER
        );
        assert!(cfg.admission.trusted_proxies.is_empty());
        assert!(cfg
            .admission
            .check_origin
            .allows(&["https://localhost:4000"]));
        assert!(!cfg
            .admission
            .check_origin
            .allows(&["https://evil.example.com"]));
        assert_eq!(cfg.connections.header_read_timeout, Duration::from_secs(10));
        assert!(cfg.connections.max_connections >= 1);

        let env: HashMap<&str, &str> = HashMap::from([
            (JWT_SECRET, "k"),
            ("HOST", "chat.example.com"),
            (MAX_CONNECTIONS_PER_IP, "0"),
            (MAX_SOCKETS_PER_USER, "3"),
            (TRUSTED_PROXIES, "10.0.0.0/8, ::1"),
            (MAX_CONNECTIONS, "100"),
            (HEADER_READ_TIMEOUT_SECS, "4"),
        ]);
        let cfg = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap();
        assert_eq!(cfg.admission.max_per_ip, 0);
        assert_eq!(cfg.admission.max_per_user, 3);
        assert_eq!(cfg.admission.trusted_proxies.len(), 2);
        assert!(cfg
            .admission
            .check_origin
            .allows(&["https://chat.example.com"]));
        assert_eq!(cfg.connections.max_connections, 100);
        assert_eq!(cfg.connections.header_read_timeout, Duration::from_secs(4));

        for (key, bad) in [
            (TRUSTED_PROXIES, "10.0.0.0/99"),
            (CHECK_ORIGIN, "ftp:/x"),
            (MAX_CONNECTIONS, "0"),
            (MAX_SOCKETS_PER_USER, "-1"),
        ] {
            let env: HashMap<&str, &str> = HashMap::from([(JWT_SECRET, "k"), (key, bad)]);
            let err = GatewayConfig::read(&mut ConfigReader::new(&env), None).unwrap_err();
            assert_eq!(err.key, key, "{bad}");
        }
    }
}
