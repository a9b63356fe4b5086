//! `quckchat.push.v1.PushService`: the device registry and the backend's
//! own notifications (authenticated by the kit's gRPC token layer).

use std::sync::Arc;

use prost::Message as _;
use quckchat_proto::push::push_service_server::{PushService as PushApi, PushServiceServer};
use quckchat_proto::push::{
    Device as DeviceMessage, ListDevicesRequest, ListDevicesResponse, NotifyRequest,
    NotifyResponse, RegisterDeviceRequest, UnregisterDeviceRequest, UnregisterDeviceResponse,
};
use quckchat_runtime::errors::ClientError;
use quckchat_runtime::grpc::check_id;
use quckchat_runtime::publish::Publisher;
use quckchat_runtime::routes;
use quckchat_runtime::time::now_ms;
use tonic::{Request, Response, Status};

use crate::devices::{Device, Devices, Platform, MAX_TOKEN_BYTES};
use crate::jobs::NOTIFY_NOTICE;

/// Users one `Notify` names at most.
pub const MAX_NOTIFY_USERS: usize = 10_000;

pub struct PushGrpc {
    devices: Arc<dyn Devices>,
    /// Where `Notify` jobs are queued (the push notices' subject).
    publisher: Publisher,
}

impl PushGrpc {
    pub fn new(devices: Arc<dyn Devices>, publisher: Publisher) -> Self {
        Self { devices, publisher }
    }

    pub fn server(devices: Arc<dyn Devices>, publisher: Publisher) -> PushServiceServer<Self> {
        PushServiceServer::new(Self::new(devices, publisher))
    }
}

fn unavailable(err: impl std::fmt::Display) -> Status {
    tracing::warn!(%err, "device registry unavailable");
    Status::from(ClientError::Unavailable)
}

pub fn device_message(d: &Device) -> DeviceMessage {
    DeviceMessage {
        user_id: d.user_id.clone(),
        platform: d.platform.as_str().to_owned(),
        token: d.token.clone(),
        app: d.app.clone().unwrap_or_default(),
        locale: d.locale.clone().unwrap_or_default(),
        updated_at_ms: d.updated_at_ms,
    }
}

/// A token: 1 to [`MAX_TOKEN_BYTES`] visible ASCII characters.
fn check_token(token: &str) -> Result<(), Status> {
    if token.is_empty()
        || token.len() > MAX_TOKEN_BYTES
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Status::invalid_argument(format!(
            "token must be 1 to {MAX_TOKEN_BYTES} visible ASCII characters"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl PushApi for PushGrpc {
    async fn register_device(
        &self,
        req: Request<RegisterDeviceRequest>,
    ) -> Result<Response<DeviceMessage>, Status> {
        let req = req.into_inner();
        check_id("user_id", &req.user_id)?;
        let platform = Platform::parse(&req.platform).ok_or_else(|| {
            Status::invalid_argument(format!(
                "platform must be fcm, apns or apns-voip, not {:?}",
                req.platform
            ))
        })?;
        check_token(&req.token)?;
        if !req.app.is_empty() {
            check_id("app", &req.app)?;
        }
        if req.locale.len() > 35 {
            return Err(Status::invalid_argument("locale must be at most 35 bytes"));
        }
        let device = Device {
            user_id: req.user_id,
            platform,
            token: req.token,
            app: Some(req.app).filter(|a| !a.is_empty()),
            locale: Some(req.locale).filter(|l| !l.is_empty()),
            updated_at_ms: now_ms(),
        };
        self.devices.register(&device).await.map_err(unavailable)?;
        Ok(Response::new(device_message(&device)))
    }

    async fn unregister_device(
        &self,
        req: Request<UnregisterDeviceRequest>,
    ) -> Result<Response<UnregisterDeviceResponse>, Status> {
        let token = req.into_inner().token;
        check_token(&token)?;
        if self.devices.unregister(&token).await.map_err(unavailable)? {
            Ok(Response::new(UnregisterDeviceResponse {}))
        } else {
            Err(Status::not_found("no device has this token"))
        }
    }

    async fn list_devices(
        &self,
        req: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let user = req.into_inner().user_id;
        check_id("user_id", &user)?;
        let devices = self
            .devices
            .devices_of(&[user])
            .await
            .map_err(unavailable)?;
        Ok(Response::new(ListDevicesResponse {
            devices: devices.iter().map(device_message).collect(),
        }))
    }

    async fn notify(
        &self,
        req: Request<NotifyRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        let mut req = req.into_inner();
        if req.user_ids.is_empty() || req.user_ids.len() > MAX_NOTIFY_USERS {
            return Err(Status::invalid_argument(format!(
                "user_ids must name 1 to {MAX_NOTIFY_USERS} users"
            )));
        }
        for u in &req.user_ids {
            check_id("user_ids", u)?;
        }
        let n = req
            .notification
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("notification is required"))?;
        if n.title.is_empty() && n.body.is_empty() {
            return Err(Status::invalid_argument(
                "notification needs a title or a body",
            ));
        }
        if req.notification_id.is_empty() {
            req.notification_id = uuid::Uuid::new_v4().simple().to_string();
        } else {
            check_id("notification_id", &req.notification_id)?;
        }
        let devices = self
            .devices
            .devices_of(&req.user_ids)
            .await
            .map_err(unavailable)?
            .iter()
            .filter(|d| d.platform != Platform::ApnsVoip)
            .count();
        self.publisher
            .notice(routes::PUSH, NOTIFY_NOTICE, req.encode_to_vec())
            .await
            .map_err(|e| {
                tracing::warn!(%e, "notification not queued");
                Status::from(ClientError::Unavailable)
            })?;
        Ok(Response::new(NotifyResponse {
            devices: u32::try_from(devices).unwrap_or(u32::MAX),
        }))
    }
}
