//! `quckchat.signaling.v1.SignalingService`: the backend's view of calls.

use std::sync::Arc;

use base64::Engine as _;
use quckchat_proto::signaling::signaling_service_server::{
    SignalingService as SignalingApi, SignalingServiceServer,
};
use quckchat_proto::signaling::{
    Call as CallMessage, EndCallRequest, GetActiveCallRequest, GetActiveCallResponse,
    ListCallsRequest, ListCallsResponse,
};
use quckchat_runtime::errors::ClientError;
use quckchat_runtime::grpc::check_id;
use tonic::{Request, Response, Status};

use crate::call::{iso_ms, Call, EndReason};
use crate::log::{Cursor, MAX_PAGE};
use crate::service::SignalingService;

/// Page size when the request names none.
pub const DEFAULT_PAGE: u32 = 20;

pub struct SignalingGrpc {
    service: Arc<SignalingService>,
}

impl SignalingGrpc {
    pub fn server(service: Arc<SignalingService>) -> SignalingServiceServer<Self> {
        SignalingServiceServer::new(Self { service })
    }

    /// The API without a server, for tests.
    #[cfg(test)]
    pub(crate) fn new_for_tests(service: Arc<SignalingService>) -> Self {
        Self { service }
    }
}

pub fn call_message(c: &Call) -> CallMessage {
    CallMessage {
        call_id: c.id.clone(),
        caller_id: c.caller_id.clone(),
        caller_device_id: c.caller_device.clone(),
        callee_id: c.callee_id.clone(),
        callee_device_id: c.callee_device.clone(),
        call_type: c.call_type.as_str().to_owned(),
        conversation_id: c.conversation_id.clone().unwrap_or_default(),
        state: c.stage.as_str().to_owned(),
        created_at: iso_ms(c.created_at_ms),
        answered_at: c.answered_at_ms.map(iso_ms).unwrap_or_default(),
        ended_at: c.ended_at_ms.map(iso_ms).unwrap_or_default(),
        end_reason: c
            .end_reason
            .map(EndReason::as_str)
            .unwrap_or_default()
            .to_owned(),
        ended_by: c.ended_by.clone().unwrap_or_default(),
        duration_ms: c.duration_ms().unwrap_or_default(),
    }
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> Status {
    tracing::warn!(%err, "{what}");
    Status::from(ClientError::Unavailable)
}

/// Page tokens: `<created_at_ms>:<call id>` of the last call, base64url.
fn encode_token(cursor: &Cursor) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}:{}", cursor.created_at_ms, cursor.id))
}

fn decode_token(token: &str) -> Result<Cursor, Status> {
    let bad = || Status::invalid_argument("page_token is not one this service issued");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (ms, id) = text.split_once(':').ok_or_else(bad)?;
    Ok(Cursor {
        created_at_ms: ms.parse().map_err(|_| bad())?,
        id: id.to_owned(),
    })
}

#[tonic::async_trait]
impl SignalingApi for SignalingGrpc {
    async fn get_active_call(
        &self,
        request: Request<GetActiveCallRequest>,
    ) -> Result<Response<GetActiveCallResponse>, Status> {
        let user_id = request.into_inner().user_id;
        check_id("user_id", &user_id)?;
        let call = self
            .service
            .calls()
            .active_call(&user_id)
            .await
            .map_err(ClientError::from)?;
        Ok(Response::new(GetActiveCallResponse {
            call: call.map(|v| call_message(&v.call)),
        }))
    }

    async fn end_call(
        &self,
        request: Request<EndCallRequest>,
    ) -> Result<Response<CallMessage>, Status> {
        let req = request.into_inner();
        check_id("call_id", &req.call_id)?;
        let reason = match req.reason.as_str() {
            "" => EndReason::Failed,
            r => EndReason::parse(r).ok_or_else(|| {
                Status::invalid_argument(
                    "reason must be hangup, rejected, no_answer, cancelled, disconnected or failed",
                )
            })?,
        };
        match self
            .service
            .end_by_system(&req.call_id, reason)
            .await
            .map_err(ClientError::from)?
        {
            Some(call) => Ok(Response::new(call_message(&call))),
            None => {
                let call = self
                    .service
                    .calls()
                    .call(&req.call_id)
                    .await
                    .map_err(ClientError::from)?
                    .ok_or_else(|| Status::from(ClientError::NotFound))?;
                Ok(Response::new(call_message(&call)))
            }
        }
    }

    async fn list_calls(
        &self,
        request: Request<ListCallsRequest>,
    ) -> Result<Response<ListCallsResponse>, Status> {
        let req = request.into_inner();
        check_id("user_id", &req.user_id)?;
        let size = match req.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let cursor = match req.page_token.as_str() {
            "" => None,
            t => Some(decode_token(t)?),
        };
        let calls = self
            .service
            .log()
            .calls_of(&req.user_id, cursor.as_ref(), size)
            .await
            .map_err(|e| unavailable("call log unavailable", e))?;
        // A full page may have a next one (which may then be empty).
        let next_page_token = match calls.last() {
            Some(last) if calls.len() == size as usize => encode_token(&Cursor::after(last)),
            _ => String::new(),
        };
        Ok(Response::new(ListCallsResponse {
            calls: calls.iter().map(call_message).collect(),
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_garbage() {
        let c = Cursor {
            created_at_ms: 1_700_000_000_123,
            id: "abc".into(),
        };
        assert_eq!(decode_token(&encode_token(&c)).unwrap(), c);
        for bad in ["!!", "bm9jb2xvbg", "eDp5"] {
            assert_eq!(
                decode_token(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }
}
