//! What signaling asks of huddle-svc over gRPC: a huddle for a call that
//! grows into a group (`call:escalate`).

use std::time::Duration;

use async_trait::async_trait;
use quckchat_proto::huddle::huddle_service_client::HuddleServiceClient;
use quckchat_proto::huddle::CreateRequest;
use quckchat_runtime::grpc::{CallError, GrpcToken, Replicas};
use quckchat_runtime::routes;

/// Longest an escalation waits for huddle-svc.
pub const HUDDLE_TIMEOUT: Duration = Duration::from_secs(2);

#[async_trait]
pub trait Huddles: Send + Sync + 'static {
    /// Creates a huddle in `conversation_id` for `created_by`; its id.
    async fn create(&self, conversation_id: &str, created_by: &str) -> Result<String, CallError>;
}

pub struct GrpcHuddles {
    huddle: Replicas,
}

impl GrpcHuddles {
    /// `urls`: huddle-svc's replicas, comma-separated.
    pub fn new(urls: &str, token: &GrpcToken) -> Result<Self, String> {
        Ok(Self {
            huddle: Replicas::new(urls, token, HUDDLE_TIMEOUT, HUDDLE_TIMEOUT)?,
        })
    }
}

#[async_trait]
impl Huddles for GrpcHuddles {
    async fn create(&self, conversation_id: &str, created_by: &str) -> Result<String, CallError> {
        let request = CreateRequest {
            conversation_id: conversation_id.to_owned(),
            title: String::new(),
            created_by: created_by.to_owned(),
        };
        self.huddle
            .call(|channel| {
                let request = request.clone();
                async move { HuddleServiceClient::new(channel).create(request).await }
            })
            .await
            .map(|h| h.into_inner().id)
            .map_err(|s| CallError::new(routes::HUDDLE, &s))
    }
}
