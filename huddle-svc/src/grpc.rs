//! `quckchat.huddle.v1.HuddleService`: the backend's and other services'
//! view of huddles (authenticated by the kit's gRPC token layer).

use std::sync::Arc;

use quckchat_proto::huddle::huddle_service_server::{
    HuddleService as HuddleApi, HuddleServiceServer,
};
use quckchat_proto::huddle::{
    CreateRequest, EndRequest, GetRequest, Huddle as HuddleMessage, ListByConversationRequest,
    ListByConversationResponse, ListParticipantsRequest, ListParticipantsResponse,
    Participant as ParticipantMessage, ParticipantRequest,
};
use quckchat_runtime::errors::ClientError;
use quckchat_runtime::grpc::check_id;
use tonic::{Request, Response, Status};

use crate::huddle::{Huddle, Room, MAX_TITLE_BYTES};
use crate::service::HuddleService;
use crate::store::MAX_LISTED;

pub struct HuddleGrpc {
    service: Arc<HuddleService>,
}

impl HuddleGrpc {
    pub fn server(service: Arc<HuddleService>) -> HuddleServiceServer<Self> {
        HuddleServiceServer::new(Self { service })
    }

    /// The API without a server, for tests.
    pub fn new(service: Arc<HuddleService>) -> Self {
        Self { service }
    }

    async fn huddle(&self, id: &str) -> Result<Huddle, Status> {
        check_id("huddle_id", id)?;
        self.service
            .store()
            .get(id)
            .await
            .map_err(|e| status(e.into()))?
            .ok_or_else(|| Status::from(ClientError::NotFound))
    }

    async fn message(&self, h: &Huddle) -> Result<HuddleMessage, Status> {
        let count = if h.ended_at_ms.is_some() {
            0
        } else {
            self.room(&h.id).await?.participants.len()
        };
        Ok(HuddleMessage {
            id: h.id.clone(),
            conversation_id: h.conversation_id.clone(),
            title: h.title.clone().unwrap_or_default(),
            created_by: h.created_by.clone(),
            created_at_ms: h.created_at_ms,
            ended_at_ms: h.ended_at_ms.unwrap_or_default(),
            participant_count: u32::try_from(count).unwrap_or(u32::MAX),
        })
    }

    async fn room(&self, id: &str) -> Result<Room, Status> {
        self.service
            .state()
            .load(id)
            .await
            .map_err(|e| status(e.into()))
    }
}

fn status(err: crate::service::HuddleError) -> Status {
    Status::from(ClientError::from(err))
}

fn participants(room: &Room) -> ListParticipantsResponse {
    ListParticipantsResponse {
        participants: room
            .participants
            .iter()
            .map(|p| ParticipantMessage {
                user_id: p.user_id.clone(),
                device_id: p.device_id.clone(),
                audio: p.audio,
                video: p.video,
                screen: p.screen,
                hand_raised: p.hand_raised,
                joined_at_ms: p.joined_at_ms,
            })
            .collect(),
        version: room.version,
    }
}

#[tonic::async_trait]
impl HuddleApi for HuddleGrpc {
    async fn create(&self, req: Request<CreateRequest>) -> Result<Response<HuddleMessage>, Status> {
        let req = req.into_inner();
        check_id("conversation_id", &req.conversation_id)?;
        check_id("created_by", &req.created_by)?;
        if req.title.len() > MAX_TITLE_BYTES {
            return Err(Status::invalid_argument(format!(
                "title must be at most {MAX_TITLE_BYTES} bytes"
            )));
        }
        let title = Some(req.title).filter(|t| !t.is_empty());
        let huddle = self
            .service
            .create(&req.conversation_id, title, &req.created_by)
            .await
            .map_err(status)?;
        Ok(Response::new(self.message(&huddle).await?))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<HuddleMessage>, Status> {
        let huddle = self.huddle(&req.into_inner().huddle_id).await?;
        Ok(Response::new(self.message(&huddle).await?))
    }

    async fn list_by_conversation(
        &self,
        req: Request<ListByConversationRequest>,
    ) -> Result<Response<ListByConversationResponse>, Status> {
        let req = req.into_inner();
        check_id("conversation_id", &req.conversation_id)?;
        let found = self
            .service
            .store()
            .by_conversation(&req.conversation_id, MAX_LISTED)
            .await
            .map_err(|e| status(e.into()))?;
        let mut huddles = Vec::with_capacity(found.len());
        for h in &found {
            huddles.push(self.message(h).await?);
        }
        Ok(Response::new(ListByConversationResponse { huddles }))
    }

    async fn list_participants(
        &self,
        req: Request<ListParticipantsRequest>,
    ) -> Result<Response<ListParticipantsResponse>, Status> {
        let huddle = self.huddle(&req.into_inner().huddle_id).await?;
        Ok(Response::new(participants(&self.room(&huddle.id).await?)))
    }

    async fn mute_participant(
        &self,
        req: Request<ParticipantRequest>,
    ) -> Result<Response<ListParticipantsResponse>, Status> {
        let req = req.into_inner();
        let (huddle, device) = self.target(&req).await?;
        let room = self
            .service
            .mute(&huddle, &req.user_id, device)
            .await
            .map_err(status)?;
        Ok(Response::new(participants(&room)))
    }

    async fn remove_participant(
        &self,
        req: Request<ParticipantRequest>,
    ) -> Result<Response<ListParticipantsResponse>, Status> {
        let req = req.into_inner();
        let (huddle, device) = self.target(&req).await?;
        let room = self
            .service
            .remove(&huddle, &req.user_id, device)
            .await
            .map_err(status)?;
        Ok(Response::new(participants(&room)))
    }

    async fn end(&self, req: Request<EndRequest>) -> Result<Response<HuddleMessage>, Status> {
        let id = req.into_inner().huddle_id;
        let huddle = self.huddle(&id).await?;
        let huddle = match self.service.end(&huddle.id).await.map_err(status)? {
            Some(ended) => ended,
            // Already ended: as it is.
            None => self.huddle(&id).await?,
        };
        Ok(Response::new(self.message(&huddle).await?))
    }
}

impl HuddleGrpc {
    /// The open huddle and device a moderation request names.
    async fn target<'r>(
        &self,
        req: &'r ParticipantRequest,
    ) -> Result<(Huddle, Option<&'r str>), Status> {
        check_id("user_id", &req.user_id)?;
        let device = if req.device_id.is_empty() {
            None
        } else {
            check_id("device_id", &req.device_id)?;
            Some(req.device_id.as_str())
        };
        let huddle = self.huddle(&req.huddle_id).await?;
        if huddle.ended_at_ms.is_some() {
            return Err(ClientError::NotFound.into());
        }
        Ok((huddle, device))
    }
}
