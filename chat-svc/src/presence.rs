//! Who of a conversation is online, for the `presence_state` a client gets
//! right after joining `chat:<id>` (Phoenix Presence). Asked of the presence
//! service over gRPC; a join never waits on it for long or fails because of it.

use std::time::Duration;

use async_trait::async_trait;
use quckchat_proto::presence::presence_service_client::PresenceServiceClient;
use quckchat_proto::presence::GetPresenceRequest;
use quckchat_runtime::grpc::{CallError, GrpcToken, Replicas};
use quckchat_runtime::presence::{entries, meta};
use quckchat_runtime::routes;
use serde_json::Value;

/// Longest a join waits for presence before going on without it.
pub const PRESENCE_TIMEOUT: Duration = Duration::from_millis(500);

#[async_trait]
pub trait PresenceLookup: Send + Sync {
    /// The `presence_state` payload for these users.
    async fn presence_state(&self, user_ids: &[String]) -> Result<Value, CallError>;
}

pub struct GrpcPresence {
    presence: Replicas,
}

impl GrpcPresence {
    /// Connects lazily to the presence service's replicas (comma-separated
    /// `urls`, or the all-in-one server), presenting `token`
    /// (`GRPC_AUTH_TOKEN`).
    pub fn new(urls: &str, token: &GrpcToken) -> Result<Self, String> {
        Ok(Self {
            presence: Replicas::new(urls, token, PRESENCE_TIMEOUT, PRESENCE_TIMEOUT)?,
        })
    }
}

#[async_trait]
impl PresenceLookup for GrpcPresence {
    async fn presence_state(&self, user_ids: &[String]) -> Result<Value, CallError> {
        let users = self
            .presence
            .call(|channel| {
                let request = GetPresenceRequest {
                    user_ids: user_ids.to_vec(),
                };
                async move {
                    PresenceServiceClient::new(channel)
                        .get_presence(request)
                        .await
                }
            })
            .await
            .map_err(|s| CallError::new(routes::PRESENCE, &s))?
            .into_inner()
            .users;
        Ok(entries(users.iter().map(|u| {
            let metas = u
                .devices
                .iter()
                .map(|d| {
                    let at = chrono::DateTime::parse_from_rfc3339(&d.online_at)
                        .map_or(0, |t| t.timestamp_millis());
                    meta(&d.device_id, &d.phx_ref, at)
                })
                .collect();
            (u.user_id.as_str(), metas)
        })))
    }
}
