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
    /// Whether any provider credentials are configured: with none, `Notify`
    /// is refused rather than queued for nobody to send.
    sending: bool,
}

impl PushGrpc {
    pub fn new(devices: Arc<dyn Devices>, publisher: Publisher, sending: bool) -> Self {
        Self {
            devices,
            publisher,
            sending,
        }
    }

    pub fn server(
        devices: Arc<dyn Devices>,
        publisher: Publisher,
        sending: bool,
    ) -> PushServiceServer<Self> {
        PushServiceServer::new(Self::new(devices, publisher, sending))
    }
}

/// `Notify` with no provider configured.
pub const PUSH_OFF: &str = "push is off: no FCM or APNS credentials are configured \
     (FIREBASE_SERVICE_ACCOUNT and FIREBASE_PROJECT_ID, APNS_KEY_ID/APNS_TEAM_ID/APNS_PRIVATE_KEY/APNS_TOPIC, or PUSH_APPS)";

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
        if !self.sending {
            return Err(Status::failed_precondition(PUSH_OFF));
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use quckchat_proto::push::push_service_server::PushService as _;
    use quckchat_proto::push::Notification as NotificationMessage;
    use quckchat_runtime::bus::{Bus, MemoryBus, Subjects};

    use super::*;
    use crate::devices::EmbeddedDevices;

    fn notify_request() -> Request<NotifyRequest> {
        Request::new(NotifyRequest {
            user_ids: vec!["alice".into()],
            notification: Some(NotificationMessage {
                title: "Maintenance".into(),
                body: "Tonight at 22:00".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn grpc(sending: bool) -> (PushGrpc, Arc<dyn Bus>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let devices = Arc::new(EmbeddedDevices::open(dir.path()).unwrap());
        let publisher = Publisher::new(bus.clone(), Subjects::new("qc"));
        (PushGrpc::new(devices, publisher, sending), bus, dir)
    }

    #[tokio::test]
    async fn notify_is_refused_when_no_provider_is_configured() {
        let (grpc, bus, _dir) = grpc(false).await;
        let mut queued = bus.subscribe("qc.svc.push.>", None).await.unwrap();
        let status = grpc.notify(notify_request()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("FIREBASE_SERVICE_ACCOUNT"));
        let nothing = tokio::time::timeout(Duration::from_millis(100), queued.next()).await;
        assert!(nothing.is_err(), "nothing may be queued for nobody to send");
    }

    #[tokio::test]
    async fn notify_is_queued_when_push_is_on() {
        let (grpc, bus, _dir) = grpc(true).await;
        let mut queued = bus.subscribe("qc.svc.push.>", None).await.unwrap();
        grpc.notify(notify_request()).await.unwrap();
        let job = tokio::time::timeout(Duration::from_secs(1), queued.next())
            .await
            .expect("the notification is queued")
            .expect("the bus is open");
        assert!(job.subject.ends_with(NOTIFY_NOTICE), "{}", job.subject);
    }
}
