//! gRPC between services: one way to build a client channel.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// How long a client waits to connect to another service.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client waits for an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily connecting channel to `url` (`http://host:port`) with the
/// connect and request timeouts above. Fails only on a malformed URL (the
/// message names it, for the variable that configured it).
pub fn client(url: &str) -> Result<Channel, String> {
    client_with_timeouts(url, CONNECT_TIMEOUT, REQUEST_TIMEOUT)
}

/// [`client`] with its own timeouts (a caller on a latency budget).
pub fn client_with_timeouts(
    url: &str,
    connect: Duration,
    request: Duration,
) -> Result<Channel, String> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("{url}: {e}"))?
        .connect_timeout(connect)
        .timeout(request)
        .connect_lazy())
}

/// A failed call to another service: which service, and what it answered.
/// Logs show all of it; a client sees only [`CallError::client_error`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{service} answered {code:?}: {message}")]
pub struct CallError {
    pub service: &'static str,
    pub code: tonic::Code,
    pub message: String,
}

impl CallError {
    pub fn new(service: &'static str, status: &tonic::Status) -> Self {
        Self {
            service,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// The reason a client gets when this call's failure reaches it.
    pub fn client_error(&self) -> crate::errors::ClientError {
        crate::errors::ClientError::from_status(&tonic::Status::new(self.code, &self.message))
    }
}

/// An id field of a request (`[A-Za-z0-9_-]{1,64}`, docs/protocol.md#topics),
/// or `INVALID_ARGUMENT` naming the field.
pub fn check_id(field: &str, id: &str) -> Result<(), tonic::Status> {
    if crate::ids::valid_id(id) {
        Ok(())
    } else {
        Err(tonic::Status::invalid_argument(format!(
            "{field} must match [A-Za-z0-9_-]{{1,64}}: {id:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_errors_keep_the_detail_for_logs_and_map_for_clients() {
        let err = CallError::new("presence", &tonic::Status::unavailable("redis down"));
        assert_eq!(err.to_string(), "presence answered Unavailable: redis down");
        assert_eq!(err.client_error(), crate::errors::ClientError::Unavailable);
    }

    #[test]
    fn ids_are_checked_naming_the_field() {
        assert!(check_id("user_id", "u-1").is_ok());
        let err = check_id("user_id", "a b").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("user_id must match"), "{err}");
    }

    #[tokio::test]
    async fn a_malformed_url_is_named() {
        let err = client("not a url").unwrap_err();
        assert!(err.starts_with("not a url: "), "{err}");
        assert!(client("http://127.0.0.1:1").is_ok(), "connects lazily");
    }
}
