//! Operations endpoints every process serves: `GET /health`, `/health/live`,
//! `/health/ready` and `/metrics` (Prometheus text format).
//!
//! Liveness only says the process runs. Readiness says it should get traffic:
//! it has finished starting, is not draining, and every dependency check
//! (bus, store, …) passes right now.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::bus::Bus;

/// How long one dependency check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A dependency whose state decides readiness.
#[async_trait]
pub trait HealthCheck: Send + Sync {
    fn name(&self) -> &'static str;
    async fn check(&self) -> Result<(), String>;
}

/// The bus as a dependency.
pub struct BusHealth(pub Arc<dyn Bus>);

#[async_trait]
impl HealthCheck for BusHealth {
    fn name(&self) -> &'static str {
        "bus"
    }

    async fn check(&self) -> Result<(), String> {
        if self.0.is_connected() {
            Ok(())
        } else {
            Err(format!("{} disconnected", self.0.kind()))
        }
    }
}

/// A dependency checked by calling something on `target` (a store's or a
/// state's `ping`), so crates need no adapter type per dependency:
///
/// ```ignore
/// admin::health_check("redis", state.clone(), |s| s.ping())   // an async_trait method
/// admin::health_check("redis", pool.clone(), |p| p.ping().boxed())
/// ```
pub fn health_check<T, E, F>(name: &'static str, target: T, check: F) -> Arc<dyn HealthCheck>
where
    T: Send + Sync + 'static,
    E: std::fmt::Display,
    F: for<'a> Fn(&'a T) -> futures::future::BoxFuture<'a, Result<(), E>> + Send + Sync + 'static,
{
    Arc::new(Pinged {
        name,
        target,
        check,
    })
}

/// What [`health_check`] makes.
pub struct Pinged<T, F> {
    name: &'static str,
    target: T,
    check: F,
}

#[async_trait]
impl<T, E, F> HealthCheck for Pinged<T, F>
where
    T: Send + Sync + 'static,
    E: std::fmt::Display,
    F: for<'a> Fn(&'a T) -> futures::future::BoxFuture<'a, Result<(), E>> + Send + Sync + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }

    async fn check(&self) -> Result<(), String> {
        (self.check)(&self.target).await.map_err(|e| e.to_string())
    }
}

/// The process's health: its dependency checks and lifecycle flags.
pub struct Health {
    node: String,
    checks: Vec<Arc<dyn HealthCheck>>,
    started: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn new(node: impl Into<String>, checks: Vec<Arc<dyn HealthCheck>>) -> Arc<Self> {
        Arc::new(Self {
            node: node.into(),
            checks,
            started: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        })
    }

    /// Listeners are up: readiness now depends on the checks.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// Shutdown began: not ready any more.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Runs every check; returns whether ready and the report.
    pub async fn report(&self) -> (bool, serde_json::Value) {
        let results = futures::future::join_all(self.checks.iter().map(|c| async move {
            let res = match tokio::time::timeout(CHECK_TIMEOUT, c.check()).await {
                Ok(r) => r,
                Err(_) => Err("check timed out".to_owned()),
            };
            (c.name(), res)
        }))
        .await;
        let mut checks = serde_json::Map::new();
        let mut all_ok = true;
        for (name, res) in results {
            let v = match res {
                Ok(()) => "ok".to_owned(),
                Err(e) => {
                    all_ok = false;
                    e
                }
            };
            checks.insert(name.to_owned(), serde_json::Value::String(v));
        }
        let started = self.started.load(Ordering::SeqCst);
        let draining = self.is_draining();
        let ready = all_ok && started && !draining;
        let status = if ready {
            "ok"
        } else if draining {
            "draining"
        } else if !started {
            "starting"
        } else {
            "unavailable"
        };
        (
            ready,
            serde_json::json!({
                "status": status,
                "node": self.node,
                "version": env!("CARGO_PKG_VERSION"),
                "checks": checks,
            }),
        )
    }
}

/// Bucket bounds (seconds) of every histogram (all are durations): from
/// 100 µs (an embedded-store read, a Redis round trip on the same host) to
/// 10 s (past `REQUEST_TIMEOUT_MS`'s default). Exported as Prometheus
/// histograms (`_bucket{le}`, `_sum`, `_count`), so replicas aggregate and
/// `histogram_quantile` works; README.md#metrics lists the metrics.
pub const HISTOGRAM_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How often histogram samples are folded into their buckets.
const METRICS_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The global Prometheus recorder, installed on first use.
///
/// The recorder keeps every histogram sample until something folds them into
/// the buckets: a scrape of `/metrics`, or its upkeep. Nothing scrapes a
/// server that no Prometheus watches, so a thread of its own runs the upkeep
/// every [`METRICS_UPKEEP_EVERY`]; without it each command's durations stayed
/// in memory for the life of the process.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // `set_buckets` fails only on an empty list.
        let recorder = PrometheusBuilder::new()
            .set_buckets(HISTOGRAM_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may exist in tests that embed several servers;
        // then ours still renders what it records through its handle.
        let _ = metrics::set_global_recorder(recorder);
        metrics::gauge!("quckchat_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        let upkeep = handle.clone();
        let started = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(METRICS_UPKEEP_EVERY);
                upkeep.run_upkeep();
            });
        if let Err(err) = started {
            tracing::warn!(%err, "metrics upkeep not started: histograms fold only when scraped");
        }
        handle
    })
}

/// The admin routes, to merge into a process's HTTP router.
pub fn router(health: Arc<Health>) -> Router {
    metrics_handle();
    Router::new()
        .route("/health", get(health_full))
        .route("/health/ready", get(health_full))
        .route("/health/live", get(live))
        .route("/metrics", get(prometheus))
        .with_state(health)
}

async fn health_full(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let (ready, body) = health.report().await;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn live() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn prometheus() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics_handle().render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flag(Arc<AtomicBool>);

    #[async_trait]
    impl HealthCheck for Flag {
        fn name(&self) -> &'static str {
            "store"
        }
        async fn check(&self) -> Result<(), String> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("store down".into())
            }
        }
    }

    #[tokio::test]
    async fn readiness_follows_start_checks_and_drain() {
        let up = Arc::new(AtomicBool::new(true));
        let health = Health::new("n1", vec![Arc::new(Flag(up.clone()))]);
        assert!(!health.report().await.0, "not ready before start");
        health.set_started();
        let (ready, body) = health.report().await;
        assert!(ready);
        assert_eq!(body["checks"]["store"], "ok");
        up.store(false, Ordering::SeqCst);
        let (ready, body) = health.report().await;
        assert!(!ready);
        assert_eq!(body["checks"]["store"], "store down");
        up.store(true, Ordering::SeqCst);
        health.set_draining();
        let (ready, body) = health.report().await;
        assert!(!ready);
        assert_eq!(body["status"], "draining");
    }

    /// A plain HTTP/1.1 GET against `router`: status, content type, body.
    async fn get(router: Router, path: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
            .await
            .expect("an HTTP answer")
            .unwrap();
        server.abort();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_default();
        (status, content_type, body.to_owned())
    }

    #[tokio::test]
    async fn health_endpoints_answer_status_node_version_and_checks() {
        let up = Arc::new(AtomicBool::new(true));
        let health = Health::new("node-7", vec![Arc::new(Flag(up.clone()))]);
        let version = env!("CARGO_PKG_VERSION");
        let app = || router(health.clone());

        let (status, ctype, body) = get(app(), "/health").await;
        assert_eq!(status, 503, "not ready before start");
        assert!(ctype.starts_with("application/json"), "{ctype}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"status": "starting", "node": "node-7", "version": version,
                               "checks": {"store": "ok"}})
        );
        health.set_started();
        for path in ["/health", "/health/ready"] {
            let (status, _, body) = get(app(), path).await;
            assert_eq!(status, 200, "{path}");
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"status": "ok", "node": "node-7", "version": version,
                                   "checks": {"store": "ok"}}),
                "{path}"
            );
        }
        up.store(false, Ordering::SeqCst);
        let (status, _, body) = get(app(), "/health/ready").await;
        assert_eq!(status, 503);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["status"], "unavailable");
        assert_eq!(body["checks"]["store"], "store down");
        // Liveness ignores dependencies.
        let (status, _, body) = get(app(), "/health/live").await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"status": "ok"})
        );
    }

    #[tokio::test]
    async fn metrics_endpoint_renders_recorded_values() {
        let health = Health::new("n1", Vec::new());
        let app = || router(health.clone());
        // The recorder is installed on first use; values before it are lost.
        metrics_handle();
        metrics::counter!("quckchat_admin_test_events_total", "kind" => "a").increment(3);
        let (status, ctype, body) = get(app(), "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(ctype, "text/plain; version=0.0.4");
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            body.lines()
                .any(|l| l == format!("quckchat_build_info{{version=\"{version}\"}} 1")),
            "{body}"
        );
        assert!(
            body.lines()
                .any(|l| l == "quckchat_admin_test_events_total{kind=\"a\"} 3"),
            "{body}"
        );
        metrics::counter!("quckchat_admin_test_events_total", "kind" => "a").increment(2);
        metrics::histogram!("quckchat_admin_test_seconds", "op" => "x").record(0.003);
        let (_, _, body) = get(app(), "/metrics").await;
        assert!(
            body.lines()
                .any(|l| l == "quckchat_admin_test_events_total{kind=\"a\"} 5"),
            "the value follows what was recorded: {body}"
        );
        // Histograms are Prometheus histograms (buckets), not summaries.
        for line in [
            "quckchat_admin_test_seconds_bucket{op=\"x\",le=\"0.0025\"} 0",
            "quckchat_admin_test_seconds_bucket{op=\"x\",le=\"0.005\"} 1",
            "quckchat_admin_test_seconds_bucket{op=\"x\",le=\"+Inf\"} 1",
            "quckchat_admin_test_seconds_count{op=\"x\"} 1",
        ] {
            assert!(body.lines().any(|l| l == line), "{line} in {body}");
        }
    }
}
