//! A socket's calls to the services: a join or push as a bus request to the
//! owning service (its reply, or the reason the client gets instead), and
//! the leave notices services ask for.

use prost::Message as _;
use quckchat_proto::bus::{command_reply, ClientCommand, CommandReply};
use quckchat_runtime::bus::BusError;
use quckchat_runtime::errors::ClientError;

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
        let subject = self.subjects.command(route.service);
        let started = std::time::Instant::now();
        let payload: bytes::Bytes = command.encode_to_vec().into();
        let timeout = self.config.bus.request_timeout;
        let mut res = self
            .bus
            .request(&subject, Vec::new(), payload.clone(), timeout)
            .await;
        if matches!(res, Err(BusError::NoResponders(_))) {
            // No replica listens right now — they may be re-subscribing after
            // a bus reconnect, or restarting. Nobody got the command, so one
            // retry is safe.
            tokio::time::sleep(NO_RESPONDERS_RETRY).await;
            metrics::counter!("quckchat_gateway_command_retries_total", "service" => route.service)
                .increment(1);
            res = self
                .bus
                .request(&subject, Vec::new(), payload, timeout)
                .await;
        }
        let join = command.event == "phx_join";
        let op = if join { "join" } else { "push" };
        metrics::histogram!(
            "quckchat_gateway_command_seconds",
            "service" => route.service,
            "op" => op,
        )
        .record(started.elapsed().as_secs_f64());
        let reply = match res {
            Ok(msg) => CommandReply::decode(msg.payload.as_ref()).map_err(|err| {
                tracing::warn!(%err, service = route.service, "undecodable reply");
                ClientError::Internal
            }),
            Err(BusError::TimedOut(_)) => Err(ClientError::Timeout),
            Err(err) => {
                tracing::warn!(%err, service = route.service, "command not delivered");
                Err(ClientError::Unavailable)
            }
        };
        let result = match &reply {
            Ok(r) if r.status() == command_reply::Status::Ok => "ok",
            // The service answered with an error (for a join: refused).
            Ok(_) if join => "refused",
            Ok(_) => "error",
            Err(ClientError::Timeout) => "timeout",
            Err(ClientError::Unavailable) => "unavailable",
            Err(_) => "internal",
        };
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
