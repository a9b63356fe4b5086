//! A socket's calls to the services: a join or push as a bus request to the
//! owning service (its reply, or the reason the client gets instead), and
//! the leave notices services ask for.

use prost::Message as _;
use quckchat_proto::bus::{command_reply, ClientCommand, CommandReply};
use quckchat_runtime::bus::BusError;
use quckchat_runtime::errors::ClientError;
use quckchat_runtime::telemetry;
use tracing::Instrument as _;

use crate::routing::Route;
use crate::Shared;

/// Wait before the one retry of a command no service listened for.
pub const NO_RESPONDERS_RETRY: std::time::Duration = std::time::Duration::from_millis(300);

impl Shared {
    /// Sends a command to the service owning `route` and waits for its reply.
    /// Errors come back as a client-facing reason.
    pub(crate) async fn request(
        &self,
        route: &Route,
        command: ClientCommand,
    ) -> Result<CommandReply, ClientError> {
        let join = command.event == "phx_join";
        // One trace per client push: this span, then the service's (its
        // parent travels in the request's headers).
        let span = tracing::info_span!(
            target: telemetry::TRACE,
            "gateway",
            otel.name = if join { "gateway.join" } else { "gateway.push" },
            otel.kind = "client",
            topic.kind = route.kind,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::record_trace_id(&span);
        let reply = self
            .request_in_span(route, command, join)
            .instrument(span.clone())
            .await;
        let result = match &reply {
            Ok(r) if r.status() == command_reply::Status::Ok => "ok",
            // The service answered with an error (for a join: refused).
            Ok(_) if join => "refused",
            Ok(_) => "error",
            Err(ClientError::Timeout) => "timeout",
            Err(ClientError::Unavailable) => "unavailable",
            Err(_) => "internal",
        };
        span.record("outcome", result);
        if result != "ok" {
            span.record("otel.status_code", "ERROR");
        }
        if join {
            metrics::counter!(
                "quckchat_gateway_joins_total",
                "kind" => route.kind,
                "result" => result,
            )
            .increment(1);
        } else {
            metrics::counter!(
                "quckchat_gateway_pushes_total",
                "kind" => route.kind,
                "result" => result,
            )
            .increment(1);
        }
        reply
    }

    /// The bus round trip of [`Shared::request`], inside its span.
    async fn request_in_span(
        &self,
        route: &Route,
        command: ClientCommand,
        join: bool,
    ) -> Result<CommandReply, ClientError> {
        let subject = self.subjects.command(route.service);
        let started = std::time::Instant::now();
        let mut headers = Vec::new();
        telemetry::inject(&mut headers);
        let payload: bytes::Bytes = command.encode_to_vec().into();
        let timeout = self.config.bus.request_timeout;
        let mut res = self
            .bus
            .request(&subject, headers.clone(), payload.clone(), timeout)
            .await;
        if matches!(res, Err(BusError::NoResponders(_))) {
            // No replica listens right now — they may be re-subscribing after
            // a bus reconnect, or restarting. Nobody got the command, so one
            // retry is safe.
            tokio::time::sleep(NO_RESPONDERS_RETRY).await;
            metrics::counter!("quckchat_gateway_command_retries_total", "service" => route.service)
                .increment(1);
            res = self.bus.request(&subject, headers, payload, timeout).await;
        }
        metrics::histogram!(
            "quckchat_gateway_command_seconds",
            "service" => route.service,
            "op" => if join { "join" } else { "push" },
        )
        .record(started.elapsed().as_secs_f64());
        match res {
            Ok(msg) => CommandReply::decode(msg.payload.as_ref()).map_err(|err| {
                tracing::warn!(%err, service = route.service, "undecodable reply");
                ClientError::Internal
            }),
            Err(BusError::TimedOut(_)) => Err(ClientError::Timeout),
            Err(err) => {
                tracing::warn!(%err, service = route.service, "command not delivered");
                Err(ClientError::Unavailable)
            }
        }
    }

    /// Fire-and-forget notice to a service (no reply expected).
    pub(crate) async fn notify(&self, route: &Route, command: ClientCommand) {
        let subject = self.subjects.command(route.service);
        if let Err(err) = self
            .bus
            .publish(&subject, None, Vec::new(), command.encode_to_vec().into())
            .await
        {
            tracing::warn!(%err, service = route.service, "leave notice not sent");
        }
    }
}
