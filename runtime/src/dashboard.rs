//! `GET /dev/dashboard`: a live page of what this process is doing (the
//! Phoenix server had a LiveDashboard there). One self-contained HTML page
//! (`dashboard.html`: inline CSS and JS, nothing fetched from elsewhere)
//! polls `GET /dev/dashboard/stats` every second and draws the figures,
//! rates and sparklines from it.
//!
//! The stats are what the process already knows: its Prometheus registry
//! ([`crate::admin::metrics_handle`]: connections, joined topics, commands by
//! event, reply latency buckets, calls and huddles, bus/store/Redis
//! counters), its [`Health`] checks, and its memory (`/proc/self`). Only
//! counts and fixed labels: no ids, tokens or message content.
//!
//! Access ([`access`]): with `DASHBOARD_TOKEN` set, a request must present it
//! (`Authorization: Bearer <token>` or `?token=<token>`; the page passes it on
//! to its stats requests); without it, only requests whose TCP peer is a
//! loopback address and that came through no proxy (no `Forwarded`,
//! `X-Forwarded-For` or `X-Real-IP`) are answered, so a process listening on
//! `0.0.0.0` does not show its dashboard to the world. `DASHBOARD_ENABLED`
//! off: both paths answer 404.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::admin::{metrics_handle, Health};
use crate::config::{ConfigError, ConfigReader};
use crate::grpc::GrpcToken;
use crate::server::ConnMeta;

pub const DASHBOARD_ENABLED: &str = "DASHBOARD_ENABLED";
pub const DASHBOARD_TOKEN: &str = "DASHBOARD_TOKEN";

/// The page.
pub const PAGE_PATH: &str = "/dev/dashboard";
/// What the page polls.
pub const STATS_PATH: &str = "/dev/dashboard/stats";

const PAGE: &str = include_str!("dashboard.html");

/// Longest health-check message shown (a dependency's error text).
const MAX_CHECK_MESSAGE: usize = 200;

/// Headers a proxy adds: a request carrying one is not a local one, even
/// when its TCP peer (the proxy) is on loopback.
const PROXY_HEADERS: &[&str] = &["forwarded", "x-forwarded-for", "x-real-ip"];

/// `DASHBOARD_ENABLED` and `DASHBOARD_TOKEN`.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    pub enabled: bool,
    /// What a request must present; `None`: local requests only. At least
    /// 16 visible ASCII characters; `Debug` masks it.
    pub token: Option<GrpcToken>,
}

impl DashboardConfig {
    /// `default_enabled`: the all-in-one serves it unless told not to; the
    /// distributed gateway only when told to.
    pub fn read(r: &mut ConfigReader<'_>, default_enabled: bool) -> Result<Self, ConfigError> {
        let enabled = r.parse(DASHBOARD_ENABLED, default_enabled)?;
        let token = r
            .secret(DASHBOARD_TOKEN)
            .map(|t| GrpcToken::new(&t).map_err(|e| ConfigError::new(DASHBOARD_TOKEN, e)))
            .transpose()?;
        Ok(Self { enabled, token })
    }

    /// Off (what a process that never reads the variables gets).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            token: None,
        }
    }
}

/// Which process serves the page: the figures mean slightly different
/// things (a gateway records no per-event command counts and sees no calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The all-in-one server: the gateway and every service in this process.
    AllInOne,
    /// A gateway of a distributed deployment: its sockets only.
    Gateway,
}

impl Scope {
    fn label(self) -> &'static str {
        match self {
            Self::AllInOne => "all-in-one",
            Self::Gateway => "gateway",
        }
    }
}

struct Dashboard {
    token: Option<GrpcToken>,
    health: Arc<Health>,
    scope: Scope,
    started: Instant,
}

/// The dashboard's routes, to merge into the process's router (which must be
/// served with `ConnectInfo<ConnMeta>` or `ConnectInfo<SocketAddr>`; without
/// either no request counts as local).
pub fn router(config: DashboardConfig, health: Arc<Health>, scope: Scope) -> Router {
    if !config.enabled {
        return Router::new()
            .route(PAGE_PATH, get(disabled))
            .route(STATS_PATH, get(disabled));
    }
    metrics_handle();
    if config.token.is_some() {
        tracing::info!(
            path = PAGE_PATH,
            "dashboard on, behind DASHBOARD_TOKEN (open {PAGE_PATH}?token=…)"
        );
    } else {
        tracing::info!(
            path = PAGE_PATH,
            "dashboard on, for local requests only (set DASHBOARD_TOKEN to open it from elsewhere)"
        );
    }
    let state = Arc::new(Dashboard {
        token: config.token,
        health,
        scope,
        started: Instant::now(),
    });
    Router::new()
        .route(PAGE_PATH, get(page))
        .route(STATS_PATH, get(stats))
        .with_state(state)
}

/// Who may see the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Granted,
    /// A token is configured and the request did not present it: 401.
    TokenRequired,
    /// No token is configured and the request is not local: 403.
    LocalOnly,
}

/// The access rule (module docs). `peer`: the TCP peer, if known; `query`:
/// the request's raw query string.
pub fn access(
    token: Option<&GrpcToken>,
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Access {
    match token {
        Some(token) => {
            let header = headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes);
            let in_query = query
                .and_then(query_token)
                .is_some_and(|t| token.matches(t.as_bytes()));
            if token.accepts(header) || in_query {
                Access::Granted
            } else {
                Access::TokenRequired
            }
        }
        None => {
            let local = peer.is_some_and(|ip| ip.to_canonical().is_loopback());
            let proxied = PROXY_HEADERS.iter().any(|h| headers.contains_key(*h));
            if local && !proxied {
                Access::Granted
            } else {
                Access::LocalOnly
            }
        }
    }
}

/// The `token` parameter of a query string, percent-decoded.
fn query_token(query: &str) -> Option<String> {
    let url = format!("http://x/?{query}");
    let uri: axum::http::Uri = url.parse().ok()?;
    let axum::extract::Query(params) =
        axum::extract::Query::<BTreeMap<String, String>>::try_from_uri(&uri).ok()?;
    params.get("token").cloned()
}

fn peer_of(request: &Request) -> Option<IpAddr> {
    let ext = request.extensions();
    ext.get::<ConnectInfo<ConnMeta>>()
        .map(|c| c.0.peer.ip())
        .or_else(|| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
}

/// `Some(refusal)` unless the request may see the dashboard.
fn refusal(dashboard: &Dashboard, request: &Request) -> Option<Response> {
    let verdict = access(
        dashboard.token.as_ref(),
        peer_of(request),
        request.headers(),
        request.uri().query(),
    );
    let (status, message) = match verdict {
        Access::Granted => return None,
        Access::TokenRequired => (
            StatusCode::UNAUTHORIZED,
            "the dashboard needs DASHBOARD_TOKEN: open /dev/dashboard?token=<token> \
             or send Authorization: Bearer <token>\n",
        ),
        Access::LocalOnly => (
            StatusCode::FORBIDDEN,
            "without DASHBOARD_TOKEN the dashboard answers only local requests \
             (from a loopback address, not through a proxy): set DASHBOARD_TOKEN \
             to open it from elsewhere\n",
        ),
    };
    let mut response = (status, no_store(), message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"quckchat-dashboard\""),
        );
    }
    Some(response)
}

fn no_store() -> [(header::HeaderName, &'static str); 1] {
    [(header::CACHE_CONTROL, "no-store")]
}

async fn disabled() -> Response {
    (
        StatusCode::NOT_FOUND,
        no_store(),
        "the dashboard is off: set DASHBOARD_ENABLED=true to serve /dev/dashboard\n",
    )
        .into_response()
}

async fn page(State(dashboard): State<Arc<Dashboard>>, request: Request) -> Response {
    if let Some(refused) = refusal(&dashboard, &request) {
        return refused;
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Everything is inline; the page talks to this origin only.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            // The token may be in the URL: send it nowhere.
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
        .into_response()
}

async fn stats(State(dashboard): State<Arc<Dashboard>>, request: Request) -> Response {
    if let Some(refused) = refusal(&dashboard, &request) {
        return refused;
    }
    let (ready, report) = dashboard.health.report().await;
    let metrics = Metrics::parse(&metrics_handle().render());
    let body = snapshot(
        &metrics,
        dashboard.scope,
        ready,
        &report,
        dashboard.started.elapsed().as_secs_f64(),
        &ProcessStats::read(),
    );
    (no_store(), Json(body)).into_response()
}

/// The stats document (what `/dev/dashboard/stats` answers).
fn snapshot(
    m: &Metrics,
    scope: Scope,
    ready: bool,
    report: &Value,
    uptime_secs: f64,
    process: &ProcessStats,
) -> Value {
    let checks: Map<String, Value> = report["checks"]
        .as_object()
        .map(|checks| {
            checks
                .iter()
                .map(|(name, status)| {
                    let status = status.as_str().unwrap_or("unknown");
                    let status: String = status.chars().take(MAX_CHECK_MESSAGE).collect();
                    (name.clone(), Value::String(status))
                })
                .collect()
        })
        .unwrap_or_default();

    // Commands answered by services, per (service, event): ok and failed.
    let mut events: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for s in m.named("quckchat_commands_total") {
        let key = (
            s.label("service").unwrap_or("?").to_owned(),
            s.label("event").unwrap_or("?").to_owned(),
        );
        let entry = events.entry(key).or_default();
        if s.label("result") == Some("ok") {
            entry.0 += s.value;
        } else {
            entry.1 += s.value;
        }
    }
    let events: Vec<Value> = events
        .into_iter()
        .map(|((service, event), (ok, failed))| {
            json!({"service": service, "event": event, "ok": ok, "failed": failed})
        })
        .collect();

    let by_kind = |name: &str| {
        let mut kinds: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for s in m.named(name) {
            let entry = kinds
                .entry(s.label("kind").unwrap_or("?").to_owned())
                .or_default();
            if s.label("result") == Some("ok") {
                entry.0 += s.value;
            } else {
                entry.1 += s.value;
            }
        }
        Value::Object(
            kinds
                .into_iter()
                .map(|(k, (ok, failed))| (k, json!({"ok": ok, "failed": failed})))
                .collect(),
        )
    };

    let latency = |op: Option<&str>| {
        let h = m.histogram("quckchat_gateway_command_seconds", |s| {
            op.is_none_or(|op| s.label("op") == Some(op))
        });
        h.to_json()
    };

    // In progress = started − ended: right for this one process, which is
    // all there is all-in-one. A gateway runs no calls or huddles.
    let in_progress = |started: f64, ended: f64| match scope {
        Scope::AllInOne => json!((started - ended).max(0.0)),
        Scope::Gateway => Value::Null,
    };
    let calls_started = m.sum_where("quckchat_calls_total", |s| {
        s.label("event") == Some("initiated")
    });
    let calls_ended = m.sum("quckchat_calls_ended_total");
    let huddles_started = m.sum_where("quckchat_huddles_total", |s| {
        s.label("event") == Some("created")
    });
    let huddles_ended = m.sum_where("quckchat_huddles_total", |s| {
        s.label("event") == Some("ended")
    });

    json!({
        "node": report["node"],
        "version": report["version"],
        "status": report["status"],
        "ready": ready,
        "scope": scope.label(),
        "time_ms": crate::time::now_ms(),
        "uptime_secs": uptime_secs,
        "connections": m.sum("quckchat_gateway_connections"),
        "http_connections": m.sum("quckchat_http_connections_open"),
        "topics": m.sum("quckchat_gateway_subscriptions"),
        "events": events,
        "joins": by_kind("quckchat_gateway_joins_total"),
        "pushes": by_kind("quckchat_gateway_pushes_total"),
        "deliveries": m.sum("quckchat_gateway_deliveries_total"),
        "refused": m.sum("quckchat_gateway_refused_total")
            + m.sum("quckchat_gateway_auth_refused_total"),
        "rate_limited": m.sum("quckchat_gateway_rate_limited_total"),
        "latency": {
            "all": latency(None),
            "join": latency(Some("join")),
            "push": latency(Some("push")),
        },
        "calls": {
            "started": calls_started,
            "answered": m.sum_where("quckchat_calls_total", |s| s.label("event") == Some("answered")),
            "ended": calls_ended,
            "in_progress": in_progress(calls_started, calls_ended),
        },
        "huddles": {
            "started": huddles_started,
            "ended": huddles_ended,
            "in_progress": in_progress(huddles_started, huddles_ended),
        },
        "checks": checks,
        "bus": {
            "dropped": m.sum("quckchat_bus_dropped_total"),
            "timeouts": m.sum("quckchat_bus_request_timeouts_total"),
        },
        "store": {
            "calls": m.histogram("quckchat_store_seconds", |_| true).count,
            "errors": m.sum("quckchat_store_errors_total"),
        },
        "redis": {
            "calls": m.histogram("quckchat_redis_seconds", |_| true).count,
            "errors": m.sum("quckchat_redis_errors_total"),
        },
        "memory": {
            "rss_bytes": process.rss_bytes,
            "peak_rss_bytes": process.peak_rss_bytes,
            "threads": process.threads,
            "open_fds": process.open_fds,
            "cpu_seconds": process.cpu_seconds,
        },
    })
}

/// One line of Prometheus text: `name{k="v",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Parses one exposition line; `None` for comments, blanks and anything
    /// unreadable.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(['{', ' '])?;
        let name = line[..name_end].to_owned();
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            loop {
                // Skip separators; `}` ends the set.
                while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
                let (start, c) = chars.next()?;
                if c == '}' {
                    rest = &inner[start + 1..];
                    break;
                }
                let mut key = String::from(c);
                loop {
                    let (_, c) = chars.next()?;
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if chars.next()?.1 != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()?.1 {
                        '"' => break,
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        c => value.push(c),
                    }
                }
                labels.push((key.trim().to_owned(), value));
            }
        }
        let value = rest.split_whitespace().next()?.parse().ok()?;
        Some(Self {
            name,
            labels,
            value,
        })
    }
}

/// A rendered registry, parsed.
#[derive(Debug, Default)]
pub struct Metrics {
    samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        Self {
            samples: text.lines().filter_map(Sample::parse).collect(),
        }
    }

    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// Every series of `name` added up (0 if none).
    pub fn sum(&self, name: &str) -> f64 {
        self.sum_where(name, |_| true)
    }

    pub fn sum_where(&self, name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
        // Folded from +0.0: `Sum` of no floats is -0.0, which would show as "-0".
        self.named(name)
            .filter(|s| keep(s))
            .fold(0.0, |total, s| total + s.value)
    }

    /// The series of histogram `name` that `keep` selects, merged.
    pub fn histogram(&self, name: &str, keep: impl Fn(&Sample) -> bool) -> Histogram {
        let bucket = format!("{name}_bucket");
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        let mut count = 0.0;
        let mut sum = 0.0;
        for s in &self.samples {
            if !keep(s) {
                continue;
            }
            if s.name == bucket {
                let Some(le) = s.label("le").and_then(|le| le.parse::<f64>().ok()) else {
                    continue;
                };
                if le.is_finite() {
                    // Bounds are positive: their bits sort as they do.
                    buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
                }
            } else if s.name.strip_prefix(name) == Some("_count") {
                count += s.value;
            } else if s.name.strip_prefix(name) == Some("_sum") {
                sum += s.value;
            }
        }
        let (le, cumulative) = buckets.into_values().unzip();
        Histogram {
            le,
            cumulative,
            count,
            sum,
        }
    }
}

/// A Prometheus histogram: finite bucket bounds with their cumulative
/// counts; `count` is the `+Inf` bucket.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Histogram {
    pub le: Vec<f64>,
    pub cumulative: Vec<f64>,
    pub count: f64,
    pub sum: f64,
}

impl Histogram {
    /// The `q` quantile as Prometheus's `histogram_quantile` estimates it
    /// (linear within the bucket; past the last finite bound: that bound).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 || self.le.is_empty() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count;
        let mut lower = 0.0;
        let mut below = 0.0;
        for (&upper, &cum) in self.le.iter().zip(&self.cumulative) {
            if cum >= rank && cum > below {
                return Some(lower + (upper - lower) * (rank - below) / (cum - below));
            }
            lower = upper;
            below = cum;
        }
        self.le.last().copied()
    }

    fn to_json(&self) -> Value {
        json!({
            "le": self.le,
            "cumulative": self.cumulative,
            "count": self.count,
            "sum": self.sum,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        })
    }
}

/// This process's memory and CPU, from `/proc/self` (zeros elsewhere).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessStats {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    pub cpu_seconds: f64,
}

impl ProcessStats {
    pub fn read() -> Self {
        let mut stats = std::fs::read_to_string("/proc/self/status")
            .map(|s| Self::from_status(&s))
            .unwrap_or_default();
        stats.open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        stats.cpu_seconds = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| cpu_seconds(&s))
            .unwrap_or(0.0);
        stats
    }

    fn from_status(status: &str) -> Self {
        let field = |key: &str| {
            status.lines().find_map(|l| {
                let v = l.strip_prefix(key)?.strip_prefix(':')?;
                v.split_whitespace().next()?.parse::<u64>().ok()
            })
        };
        Self {
            rss_bytes: field("VmRSS").unwrap_or(0) * 1024,
            peak_rss_bytes: field("VmHWM").unwrap_or(0) * 1024,
            threads: field("Threads").unwrap_or(0),
            ..Self::default()
        }
    }
}

/// User + system CPU time from `/proc/self/stat` (fields 14 and 15, in
/// clock ticks: USER_HZ, 100 on Linux).
fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // `after` starts at field 3, so fields 14 and 15 are its 12th and 13th.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const TOKEN: &str = "dashboard-token-0123456789";

    fn token() -> GrpcToken {
        GrpcToken::new(TOKEN).unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn config_defaults_per_process_and_validates_the_token() {
        let env: HashMap<&str, &str> = HashMap::new();
        let c = DashboardConfig::read(&mut ConfigReader::new(&env), true).unwrap();
        assert!(c.enabled && c.token.is_none());
        let c = DashboardConfig::read(&mut ConfigReader::new(&env), false).unwrap();
        assert!(!c.enabled);

        let env = HashMap::from([(DASHBOARD_ENABLED, "false"), (DASHBOARD_TOKEN, TOKEN)]);
        let mut r = ConfigReader::new(&env);
        let c = DashboardConfig::read(&mut r, true).unwrap();
        assert!(!c.enabled);
        assert!(c.token.unwrap().matches(TOKEN.as_bytes()));
        assert!(!r.summary().contains(TOKEN), "the token is logged masked");
        assert!(!format!("{:?}", DashboardConfig::read(&mut r, true)).contains(TOKEN));

        for (key, bad) in [
            (DASHBOARD_ENABLED, "yes"),
            (DASHBOARD_TOKEN, "short"),
            (DASHBOARD_TOKEN, "has spaces in the middle of it"),
        ] {
            let env = HashMap::from([(key, bad)]);
            let err = DashboardConfig::read(&mut ConfigReader::new(&env), true).unwrap_err();
            assert_eq!(err.key, key, "{bad}");
        }
    }

    #[test]
    fn without_a_token_only_local_unproxied_requests_get_in() {
        let none = HeaderMap::new();
        assert_eq!(access(None, LOOPBACK, &none, None), Access::Granted);
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(access(None, Some(v6), &none, None), Access::Granted);
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(access(None, Some(mapped), &none, None), Access::Granted);
        for remote in ["10.1.2.3", "192.168.0.9", "2001:db8::1", "0.0.0.0"] {
            let ip: IpAddr = remote.parse().unwrap();
            assert_eq!(
                access(None, Some(ip), &none, None),
                Access::LocalOnly,
                "{remote}"
            );
        }
        assert_eq!(access(None, None, &none, None), Access::LocalOnly);
        // A proxy on the same host forwarding the world is not local.
        for h in ["x-forwarded-for", "forwarded", "x-real-ip"] {
            let hs = headers(&[(h, "203.0.113.7")]);
            assert_eq!(access(None, LOOPBACK, &hs, None), Access::LocalOnly, "{h}");
        }
        // A token presented when none is configured changes nothing.
        let q = Some("token=whatever-it-is-here");
        let remote: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        assert_eq!(access(None, remote, &none, q), Access::LocalOnly);
    }

    #[test]
    fn with_a_token_every_request_must_present_it() {
        let t = token();
        let none = HeaderMap::new();
        let remote: Option<IpAddr> = Some("203.0.113.7".parse().unwrap());
        // Even from loopback.
        assert_eq!(
            access(Some(&t), LOOPBACK, &none, None),
            Access::TokenRequired
        );
        for peer in [LOOPBACK, remote, None] {
            let bearer = headers(&[("authorization", &format!("Bearer {TOKEN}"))]);
            assert_eq!(access(Some(&t), peer, &bearer, None), Access::Granted);
            let lower = headers(&[("authorization", &format!("bearer {TOKEN}"))]);
            assert_eq!(access(Some(&t), peer, &lower, None), Access::Granted);
            let q = format!("x=1&token={TOKEN}");
            assert_eq!(access(Some(&t), peer, &none, Some(&q)), Access::Granted);
        }
        let wrong = headers(&[("authorization", "Bearer dashboard-token-0123456788")]);
        assert_eq!(
            access(Some(&t), LOOPBACK, &wrong, None),
            Access::TokenRequired
        );
        let basic = headers(&[("authorization", &format!("Basic {TOKEN}"))]);
        assert_eq!(
            access(Some(&t), LOOPBACK, &basic, None),
            Access::TokenRequired
        );
        for q in [
            "token=",
            "token=dashboard-token-012345678",
            "tok=dashboard-token-0123456789",
            "%%%",
        ] {
            assert_eq!(
                access(Some(&t), remote, &none, Some(q)),
                Access::TokenRequired,
                "{q}"
            );
        }
        // Percent-encoded in the query.
        let t2 = GrpcToken::new("a+b/c=d~e!f*g(h)i").unwrap();
        assert_eq!(
            access(
                Some(&t2),
                remote,
                &none,
                Some("token=a%2Bb%2Fc%3Dd~e!f*g(h)i")
            ),
            Access::Granted
        );
    }

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP x\n# TYPE quckchat_a counter\nquckchat_a 3\n\
                    quckchat_b{k=\"v\",q=\"a \\\"quoted\\\" one, with } and \\\\\"} 2.5\n\
                    quckchat_c_bucket{op=\"x\",le=\"+Inf\"} 7\n  \nnonsense{\n";
        let m = Metrics::parse(text);
        assert_eq!(m.sum("quckchat_a"), 3.0);
        let b = m.named("quckchat_b").next().unwrap();
        assert_eq!(b.label("k"), Some("v"));
        assert_eq!(b.label("q"), Some("a \"quoted\" one, with } and \\"));
        assert_eq!(b.value, 2.5);
        let c = m.named("quckchat_c_bucket").next().unwrap();
        assert_eq!(c.label("le"), Some("+Inf"));
        assert_eq!(m.samples.len(), 3);
        assert_eq!(m.sum("absent"), 0.0);
        assert!(m.sum("absent").is_sign_positive(), "0, not -0");
    }

    #[test]
    fn histogram_quantiles_follow_prometheus() {
        let text = "h_bucket{op=\"a\",le=\"0.1\"} 0\nh_bucket{op=\"a\",le=\"0.2\"} 50\n\
                    h_bucket{op=\"a\",le=\"0.4\"} 100\nh_bucket{op=\"a\",le=\"+Inf\"} 100\n\
                    h_sum{op=\"a\"} 20\nh_count{op=\"a\"} 100\n\
                    h_bucket{op=\"b\",le=\"0.1\"} 10\nh_bucket{op=\"b\",le=\"0.2\"} 10\n\
                    h_bucket{op=\"b\",le=\"0.4\"} 10\nh_bucket{op=\"b\",le=\"+Inf\"} 20\n\
                    h_sum{op=\"b\"} 30\nh_count{op=\"b\"} 20\n";
        let m = Metrics::parse(text);
        let a = m.histogram("h", |s| s.label("op") == Some("a"));
        assert_eq!(a.le, vec![0.1, 0.2, 0.4]);
        assert_eq!(a.cumulative, vec![0.0, 50.0, 100.0]);
        assert_eq!((a.count, a.sum), (100.0, 20.0));
        assert!((a.quantile(0.5).unwrap() - 0.2).abs() < 1e-9);
        assert!((a.quantile(0.75).unwrap() - 0.3).abs() < 1e-9);
        assert!((a.quantile(0.25).unwrap() - 0.15).abs() < 1e-9);
        let b = m.histogram("h", |s| s.label("op") == Some("b"));
        // Half past the last finite bound: that bound.
        assert_eq!(b.quantile(0.99), Some(0.4));
        assert!((b.quantile(0.25).unwrap() - 0.05).abs() < 1e-9);
        let all = m.histogram("h", |_| true);
        assert_eq!(all.cumulative, vec![10.0, 60.0, 110.0]);
        assert_eq!(all.count, 120.0);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn reads_proc_figures() {
        let s = ProcessStats::from_status(
            "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t7\n",
        );
        assert_eq!(
            (s.rss_bytes, s.peak_rss_bytes, s.threads),
            (1024 * 1024, 2048 * 1024, 7)
        );
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0";
        assert_eq!(cpu_seconds(stat), Some(4.0));
        if cfg!(target_os = "linux") {
            let s = ProcessStats::read();
            assert!(s.rss_bytes > 0 && s.threads > 0 && s.open_fds > 0, "{s:?}");
        }
    }

    #[test]
    fn snapshot_has_the_figures_and_no_ids() {
        let text = "quckchat_gateway_connections 2\nquckchat_gateway_subscriptions 3\n\
            quckchat_commands_total{service=\"chat\",event=\"message:send\",result=\"ok\"} 5\n\
            quckchat_commands_total{service=\"chat\",event=\"message:send\",result=\"unauthorized\"} 1\n\
            quckchat_gateway_joins_total{kind=\"chat\",result=\"ok\"} 4\n\
            quckchat_calls_total{event=\"initiated\"} 3\nquckchat_calls_total{event=\"merged\"} 1\n\
            quckchat_calls_ended_total{reason=\"hangup\"} 1\n\
            quckchat_huddles_total{event=\"created\"} 2\nquckchat_huddles_total{event=\"ended\"} 2\n\
            quckchat_gateway_command_seconds_bucket{service=\"chat\",op=\"push\",le=\"0.001\"} 1\n\
            quckchat_gateway_command_seconds_bucket{service=\"chat\",op=\"push\",le=\"+Inf\"} 1\n\
            quckchat_gateway_command_seconds_count{service=\"chat\",op=\"push\"} 1\n";
        let report = json!({"status": "ok", "node": "n1", "version": "1",
                            "checks": {"bus": "ok", "store": "x".repeat(500)}});
        let m = Metrics::parse(text);
        let s = snapshot(
            &m,
            Scope::AllInOne,
            true,
            &report,
            1.5,
            &ProcessStats::default(),
        );
        assert_eq!(s["connections"], 2.0);
        assert_eq!(s["topics"], 3.0);
        assert_eq!(
            s["events"],
            json!([{"service": "chat", "event": "message:send", "ok": 5.0, "failed": 1.0}])
        );
        assert_eq!(s["joins"]["chat"], json!({"ok": 4.0, "failed": 0.0}));
        assert_eq!(s["calls"]["in_progress"], 2.0);
        assert_eq!(s["huddles"]["in_progress"], 0.0);
        assert_eq!(s["latency"]["push"]["count"], 1.0);
        assert_eq!(s["latency"]["join"]["count"], 0.0);
        assert_eq!(s["latency"]["join"]["p50"], Value::Null);
        assert_eq!(s["checks"]["bus"], "ok");
        assert_eq!(
            s["checks"]["store"].as_str().unwrap().len(),
            MAX_CHECK_MESSAGE
        );
        assert_eq!(s["scope"], "all-in-one");
        let g = snapshot(
            &m,
            Scope::Gateway,
            true,
            &report,
            1.5,
            &ProcessStats::default(),
        );
        assert_eq!(g["calls"]["in_progress"], Value::Null);
    }
}
