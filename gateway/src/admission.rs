//! Who may open a socket, decided before the upgrade (docs/protocol.md#connection):
//!
//! - the page's `Origin` (`CHECK_ORIGIN`, Phoenix-style: by default the
//!   configured `HOST` on any scheme and port; no `Origin` header at all is
//!   allowed, native clients send none; `null` is refused) → 403;
//! - sockets per client address (`MAX_CONNECTIONS_PER_IP`; the client is
//!   taken from `X-Forwarded-For` only when the peer is one of
//!   `TRUSTED_PROXIES`; IPv6 counts per /64) → 429;
//! - sockets per user (`MAX_SOCKETS_PER_USER`) → 429.
//!
//! A [`Ticket`] holds a socket's places in the counts and frees them when
//! the socket ends.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use quckchat_runtime::config::{ConfigError, ConfigReader};

pub const CHECK_ORIGIN: &str = "CHECK_ORIGIN";
pub const MAX_CONNECTIONS_PER_IP: &str = "MAX_CONNECTIONS_PER_IP";
pub const MAX_SOCKETS_PER_USER: &str = "MAX_SOCKETS_PER_USER";
pub const TRUSTED_PROXIES: &str = "TRUSTED_PROXIES";

/// Admission settings of the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    pub check_origin: OriginCheck,
    /// Sockets per client address; 0 = no limit.
    pub max_per_ip: usize,
    /// Sockets per user; 0 = no limit.
    pub max_per_user: usize,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

impl AdmissionConfig {
    pub const DEFAULT_MAX_PER_IP: usize = 1000;
    pub const DEFAULT_MAX_PER_USER: usize = 20;

    /// Reads the settings; `host` is the configured `HOST` (the default
    /// allowed origin).
    pub fn read(r: &mut ConfigReader<'_>, host: &str) -> Result<Self, ConfigError> {
        let origin = r.string(CHECK_ORIGIN, "true");
        let check_origin =
            OriginCheck::parse(&origin, host).map_err(|e| ConfigError::new(CHECK_ORIGIN, e))?;
        let max_per_ip = r.parse(MAX_CONNECTIONS_PER_IP, Self::DEFAULT_MAX_PER_IP)?;
        let max_per_user = r.parse(MAX_SOCKETS_PER_USER, Self::DEFAULT_MAX_PER_USER)?;
        let trusted_proxies = match r.optional(TRUSTED_PROXIES) {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<IpNet>())
                .collect::<Result<_, _>>()
                .map_err(|e| ConfigError::new(TRUSTED_PROXIES, e))?,
        };
        Ok(Self {
            check_origin,
            max_per_ip,
            max_per_user,
            trusted_proxies,
        })
    }
}

/// Which `Origin` headers may open a socket.
#[derive(Debug, Clone, PartialEq)]
pub enum OriginCheck {
    /// `CHECK_ORIGIN=false`: any (native-only deployments).
    Off,
    /// Origins matching one of these; no `Origin` header is allowed too.
    Allow(Vec<OriginPattern>),
}

impl OriginCheck {
    /// `false`; `true` (the host `host`, any scheme and port); or a comma
    /// separated list of `scheme://host[:port]`, `//host` (any scheme) or
    /// `host`, where the host may be `*.example.com` (subdomains).
    pub fn parse(value: &str, host: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "false" => Ok(Self::Off),
            "true" => Ok(Self::Allow(vec![OriginPattern::parse(host)?])),
            list => {
                let patterns = list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(OriginPattern::parse)
                    .collect::<Result<Vec<_>, _>>()?;
                if patterns.is_empty() {
                    return Err("no origins: list them, or set false".into());
                }
                Ok(Self::Allow(patterns))
            }
        }
    }

    /// Whether a request with these `Origin` values may open a socket.
    pub fn allows(&self, origins: &[&str]) -> bool {
        let Self::Allow(patterns) = self else {
            return true;
        };
        match origins {
            [] => true,
            [one] => Origin::parse(one).is_some_and(|o| patterns.iter().any(|p| p.matches(&o))),
            _ => false,
        }
    }
}

/// One allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: Option<String>,
    /// Lower case; for a wildcard, the part after `*.`.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl OriginPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let (scheme, rest) = match lower.split_once("//") {
            Some(("", rest)) => (None, rest),
            Some((scheme, rest)) => match scheme.strip_suffix(':') {
                Some(scheme) if !scheme.is_empty() => (Some(scheme.to_owned()), rest),
                _ => return Err(format!("{s:?}: expected scheme://host[:port]")),
            },
            None => (None, lower.as_str()),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) =
            split_host_port(rest).ok_or_else(|| format!("{s:?}: bad host or port"))?;
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(base) => (base.to_owned(), true),
            None => (host.to_owned(), false),
        };
        if host.is_empty() || host.contains('*') || host.contains('/') {
            return Err(format!("{s:?}: bad host"));
        }
        Ok(Self {
            scheme,
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, o: &Origin) -> bool {
        let host = if self.wildcard {
            o.host
                .strip_suffix(&self.host)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
        } else {
            o.host == self.host
        };
        host && self.scheme.as_ref().is_none_or(|s| *s == o.scheme)
            && self.port.is_none_or(|p| Some(p) == o.port)
    }
}

/// A parsed `Origin` header: `scheme://host[:port]`.
struct Origin {
    scheme: String,
    host: String,
    /// Explicit, or the scheme's default.
    port: Option<u16>,
}

impl Origin {
    fn parse(s: &str) -> Option<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let (scheme, rest) = lower.split_once("://")?;
        if scheme.is_empty() || rest.is_empty() || rest.contains('/') {
            return None;
        }
        let (host, port) = split_host_port(rest)?;
        let port = port.or(match scheme {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        });
        Some(Self {
            scheme: scheme.to_owned(),
            host: host.to_owned(),
            port,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host, port));
    }
    match s.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((s, None)),
    }
}

/// An address or a network (`10.0.0.0/8`, `fd00::/8`, `127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|e| format!("{s:?}: {e} (an IP address or CIDR)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?,
        };
        Ok(Self {
            addr: canonical(addr),
            prefix,
        })
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the peer's, or, when the peer is a trusted proxy,
/// the right-most `X-Forwarded-For` entry that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut client = canonical(peer);
    if !is_trusted(client) {
        return client;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(canonical)
}

/// The address a client is counted under: IPv6 by /64 (one host's share).
fn ip_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// Why a socket was refused before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Origin,
    IpLimit,
    UserLimit,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Self::Origin => "origin",
            Self::IpLimit => "ip_limit",
            Self::UserLimit => "user_limit",
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        metrics::counter!("quckchat_gateway_refused_total", "reason" => self.label()).increment(1);
        match self {
            Self::Origin => (StatusCode::FORBIDDEN, "origin not allowed").into_response(),
            Self::IpLimit => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address",
            )
                .into_response(),
            Self::UserLimit => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many sockets for this user",
            )
                .into_response(),
        }
    }
}

#[derive(Default)]
struct Counts {
    ips: HashMap<IpAddr, usize>,
    /// Keyed by the sockets' own user id (shared, not copied).
    users: HashMap<Arc<str>, usize>,
}

/// The admission checks and the counts of open sockets.
pub struct Admission {
    config: AdmissionConfig,
    counts: Arc<Mutex<Counts>>,
}

/// A socket's places in the counts; freed on drop.
pub struct Ticket {
    counts: Arc<Mutex<Counts>>,
    ip: Option<IpAddr>,
    user: Option<Arc<str>>,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            config,
            counts: Arc::default(),
        }
    }

    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let origins: Vec<&str> = headers
            .get_all("origin")
            .iter()
            .map(|v| v.to_str().unwrap_or("null"))
            .collect();
        if self.config.check_origin.allows(&origins) {
            Ok(())
        } else {
            tracing::debug!(
                ?origins,
                "socket refused: origin not allowed (CHECK_ORIGIN)"
            );
            Err(Refusal::Origin)
        }
    }

    /// Takes a place for the client at `peer` (unknown peers are not counted).
    pub fn admit_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Result<Ticket, Refusal> {
        let mut ticket = Ticket {
            counts: self.counts.clone(),
            ip: None,
            user: None,
        };
        let max = self.config.max_per_ip;
        let Some(peer) = peer.filter(|_| max > 0) else {
            return Ok(ticket);
        };
        let key = ip_key(client_ip(peer, headers, &self.config.trusted_proxies));
        let mut counts = lock(&self.counts);
        if counts.ips.get(&key).is_some_and(|n| *n >= max) {
            tracing::debug!(client = %key, "socket refused: MAX_CONNECTIONS_PER_IP");
            return Err(Refusal::IpLimit);
        }
        *counts.ips.entry(key).or_default() += 1;
        ticket.ip = Some(key);
        Ok(ticket)
    }

    /// Takes a place for `user` on `ticket`.
    pub fn admit_user(&self, ticket: &mut Ticket, user: &Arc<str>) -> Result<(), Refusal> {
        let max = self.config.max_per_user;
        if max == 0 {
            return Ok(());
        }
        let mut counts = lock(&self.counts);
        if counts.users.get(user).is_some_and(|n| *n >= max) {
            tracing::debug!(%user, "socket refused: MAX_SOCKETS_PER_USER");
            return Err(Refusal::UserLimit);
        }
        *counts.users.entry(user.clone()).or_default() += 1;
        ticket.user = Some(user.clone());
        Ok(())
    }
}

fn lock(counts: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    counts.lock().unwrap_or_else(|e| e.into_inner())
}

fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    // Entries at zero are removed, so the maps hold only open sockets.
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(ip) = &self.ip {
            release(&mut counts.ips, ip);
        }
        if let Some(user) = &self.user {
            release(&mut counts.users, user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: &str) -> OriginCheck {
        OriginCheck::parse(value, "chat.example.com").unwrap()
    }

    #[test]
    fn origin_default_is_the_host_on_any_scheme_and_port() {
        let c = check("true");
        assert!(c.allows(&[]));
        assert!(c.allows(&["https://chat.example.com"]));
        assert!(c.allows(&["http://CHAT.example.com:8080"]));
        assert!(!c.allows(&["https://evil.example.com"]));
        assert!(!c.allows(&["https://chat.example.com.evil.com"]));
        assert!(!c.allows(&["null"]));
        assert!(!c.allows(&["garbage"]));
        assert!(!c.allows(&["https://chat.example.com", "https://chat.example.com"]));
        assert!(check("false").allows(&["null"]));
    }

    #[test]
    fn origin_lists_with_schemes_ports_and_wildcards() {
        let c = check("https://app.example.com, //*.example.org, http://localhost:3000");
        assert!(c.allows(&["https://app.example.com"]));
        assert!(c.allows(&["https://app.example.com:443"]));
        assert!(!c.allows(&["http://app.example.com"]));
        assert!(c.allows(&["http://a.b.example.org"]));
        assert!(!c.allows(&["https://example.org"]));
        assert!(!c.allows(&["https://badexample.org"]));
        assert!(c.allows(&["http://localhost:3000"]));
        assert!(!c.allows(&["http://localhost:3001"]));
        assert!(!c.allows(&["http://[::1]:4000"]));
        assert!(OriginCheck::parse("https://", "h").is_err());
        assert!(OriginCheck::parse("a:b", "h").is_err());
        assert!(OriginCheck::parse(" , ", "h").is_err());
    }

    #[test]
    fn networks_and_forwarded_clients() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!("fd00::/8"
            .parse::<IpNet>()
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!("0.0.0.0/0"
            .parse::<IpNet>()
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("proxy".parse::<IpNet>().is_err());

        let trusted = vec![net];
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.9, 10.0.0.2".parse().unwrap(),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_ip(proxy, &headers, &trusted).to_string(),
            "203.0.113.9"
        );
        assert_eq!(client_ip(stranger, &headers, &trusted), stranger);
        assert_eq!(client_ip(proxy, &headers, &[]), proxy);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
        assert_eq!(
            ip_key("2001:db8::1".parse().unwrap()),
            ip_key("2001:db8::ffff".parse().unwrap())
        );
    }

    #[test]
    fn tickets_free_their_places() {
        let admission = Admission::new(AdmissionConfig {
            check_origin: OriginCheck::Off,
            max_per_ip: 1,
            max_per_user: 1,
            trusted_proxies: Vec::new(),
        });
        let ip = Some("192.0.2.1".parse().unwrap());
        let h = HeaderMap::new();
        let mut t = admission.admit_ip(ip, &h).unwrap();
        assert_eq!(admission.admit_ip(ip, &h).err(), Some(Refusal::IpLimit));
        admission.admit_user(&mut t, &"alice".into()).unwrap();
        let mut other = admission
            .admit_ip(Some("192.0.2.2".parse().unwrap()), &h)
            .unwrap();
        assert_eq!(
            admission.admit_user(&mut other, &"alice".into()),
            Err(Refusal::UserLimit)
        );
        drop(t);
        admission.admit_user(&mut other, &"alice".into()).unwrap();
        assert!(admission.admit_ip(ip, &h).is_ok());
    }
}
