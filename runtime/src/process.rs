//! What every QuckChat binary does first and last: logging, configuration
//! from the environment (one line and exit 64 when it is bad), the
//! configuration logged; and one line with exit 1 when the process fails.

use crate::config::{exit_on_config_error, ConfigError, ConfigReader, ProcessEnv};

/// Sets up logging and reads the process's configuration.
pub fn start<T>(
    process: &str,
    read: impl FnOnce(&mut ConfigReader<'_>) -> Result<T, ConfigError>,
) -> T {
    if let Err(e) = crate::telemetry::init(process) {
        exit_on_config_error(process, &e);
    }
    let mut reader = ConfigReader::new(&ProcessEnv);
    let config = read(&mut reader).unwrap_or_else(|e| exit_on_config_error(process, &e));
    reader.log(process);
    config
}

/// Ends the process: exit 1 with one line naming the failure.
pub fn finish(process: &str, result: anyhow::Result<()>) {
    crate::telemetry::shutdown();
    if let Err(err) = result {
        eprintln!("{process}: {err:#}");
        std::process::exit(1);
    }
}

/// A distributed service process: its bus, its shutdown and its port. A
/// service's `main.rs` connects one, builds the service on [`Node::bus`],
/// and hands [`Node::serve`] its health checks, gRPC routes and workers.
/// The gRPC routes are served behind the `GRPC_AUTH_TOKEN` check
/// ([`crate::grpc::authenticated`]); a service does not write it.
pub struct Node {
    name: &'static str,
    server: crate::config::ServerConfig,
    grpc_token: crate::grpc::GrpcToken,
    bus: std::sync::Arc<dyn crate::bus::Bus>,
    subjects: crate::bus::Subjects,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Node {
    /// Connects to NATS (a failure names `NATS_URL`) and cancels
    /// [`Node::shutdown`] on SIGTERM/SIGINT. `grpc_token` guards this
    /// node's gRPC routes and is what its clients of other services present.
    pub async fn connect(
        name: &'static str,
        server: &crate::config::ServerConfig,
        bus: &crate::config::BusConfig,
        grpc_token: &crate::grpc::GrpcToken,
    ) -> anyhow::Result<Self> {
        let nats = crate::bus::NatsBus::connect(&bus.nats_url, &server.node_name)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", crate::config::NATS_URL))?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        crate::shutdown::cancel_on_signal(shutdown.clone());
        Ok(Self {
            name,
            server: server.clone(),
            grpc_token: grpc_token.clone(),
            bus: std::sync::Arc::new(nats),
            subjects: crate::bus::Subjects::new(bus.subject_prefix.clone()),
            shutdown,
        })
    }

    pub fn bus(&self) -> std::sync::Arc<dyn crate::bus::Bus> {
        self.bus.clone()
    }

    pub fn subjects(&self) -> &crate::bus::Subjects {
        &self.subjects
    }

    /// The token this node's gRPC clients present to other services.
    pub fn grpc_token(&self) -> &crate::grpc::GrpcToken {
        &self.grpc_token
    }

    /// Cancelled when the process is asked to stop.
    pub fn shutdown(&self) -> tokio_util::sync::CancellationToken {
        self.shutdown.clone()
    }

    /// How long work in flight may take to finish after a stop.
    pub fn drain(&self) -> std::time::Duration {
        self.server.drain
    }

    /// Serves `/health*`, `/metrics` (open) and `grpc` (behind the token
    /// check) on `PORT` (ready while the bus and every check answer) until
    /// the stop, then waits for `workers` to finish their drain.
    pub async fn serve(
        self,
        checks: Vec<std::sync::Arc<dyn crate::admin::HealthCheck>>,
        grpc: tonic::service::Routes,
        workers: Vec<tokio::task::JoinHandle<()>>,
    ) -> anyhow::Result<()> {
        let mut all: Vec<std::sync::Arc<dyn crate::admin::HealthCheck>> =
            vec![std::sync::Arc::new(crate::admin::BusHealth(
                self.bus.clone(),
            ))];
        all.extend(checks);
        let health = crate::admin::Health::new(self.server.node_name.clone(), all);
        let grpc = crate::grpc::authenticated(grpc, &self.grpc_token);
        let router = crate::admin::router(health.clone()).merge(grpc);
        let addr = self.server.listen_addr();
        let listener = crate::server::bind(addr).await?;
        tracing::info!(%addr, "{} listening", self.name);
        // The port answers 503 on /health/ready until the workers drained.
        let drained = async move {
            for worker in workers {
                if let Err(err) = worker.await {
                    tracing::warn!(%err, "a worker ended abnormally");
                }
            }
        };
        crate::server::serve_with_health(listener, router, self.shutdown, health, drained).await?;
        tracing::info!("{} stopped", self.name);
        Ok(())
    }
}
