//! `quckchat.presence.v1.PresenceService`.

use std::sync::Arc;

use quckchat_proto::presence::presence_service_server::{
    PresenceService as PresenceApi, PresenceServiceServer,
};
use quckchat_proto::presence::{Device, GetPresenceRequest, GetPresenceResponse, UserPresence};
use quckchat_runtime::grpc::check_id;
use quckchat_runtime::time::iso;
use tonic::{Request, Response, Status};

use crate::state::PresenceState;

/// Most users in one `GetPresence`.
pub const MAX_USERS: usize = 10_000;

pub struct PresenceGrpc {
    state: Arc<dyn PresenceState>,
}

impl PresenceGrpc {
    pub fn server(state: Arc<dyn PresenceState>) -> PresenceServiceServer<Self> {
        PresenceServiceServer::new(Self { state })
    }
}

fn ms_iso(ms: i64) -> String {
    iso(chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default())
}

#[tonic::async_trait]
impl PresenceApi for PresenceGrpc {
    async fn get_presence(
        &self,
        request: Request<GetPresenceRequest>,
    ) -> Result<Response<GetPresenceResponse>, Status> {
        let ids = request.into_inner().user_ids;
        if ids.len() > MAX_USERS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_USERS} user_ids per call"
            )));
        }
        for id in &ids {
            check_id("user_ids", id)?;
        }
        let presence = self.state.presence(&ids).await.map_err(|e| {
            tracing::warn!(%e, "presence state unavailable");
            Status::unavailable("presence state unavailable")
        })?;
        Ok(Response::new(GetPresenceResponse {
            users: presence
                .into_iter()
                .map(|p| UserPresence {
                    online: p.online(),
                    last_seen_at: p.last_seen_ms.map(ms_iso).unwrap_or_default(),
                    devices: p
                        .devices
                        .into_iter()
                        .map(|d| Device {
                            online_at: ms_iso(d.online_at_ms),
                            device_id: d.device_id,
                            phx_ref: d.phx_ref,
                        })
                        .collect(),
                    user_id: p.user_id,
                })
                .collect(),
        }))
    }
}
