//! gRPC between services: one credential check every service's routes get,
//! and one way to build a client channel that presents the credential.
//!
//! gRPC is served on the same port as HTTP and WebSocket, so it is reachable
//! by whoever reaches that port. Every gRPC route — of every service, in the
//! distributed binaries and in the all-in-one server — sits behind
//! [`authenticated`]: a call must carry `authorization: Bearer
//! <GRPC_AUTH_TOKEN>`; a missing or wrong credential gets `UNAUTHENTICATED`
//! and never reaches the service. `/health*` and `/metrics` are not gRPC
//! routes and stay open.

use std::sync::Arc;
use std::time::Duration;

use subtle::ConstantTimeEq as _;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::config::{ConfigError, ConfigReader, GRPC_AUTH_TOKEN};

/// Shortest `GRPC_AUTH_TOKEN` accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// The shared secret gRPC callers present (`GRPC_AUTH_TOKEN`). Its `Debug`
/// output is masked.
#[derive(Clone)]
pub struct GrpcToken(Arc<str>);

impl std::fmt::Debug for GrpcToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcToken(******)")
    }
}

impl GrpcToken {
    /// A token from configuration: at least [`MIN_TOKEN_LEN`] visible ASCII
    /// characters (it travels in a header), no spaces.
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!("must be at least {MIN_TOKEN_LEN} characters"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII without spaces".into());
        }
        Ok(Self(token.into()))
    }

    /// A random token (256 bits from the OS-seeded CSPRNG), for a process
    /// whose only gRPC callers are its own.
    pub fn generate() -> Self {
        use base64::Engine as _;
        use rand::RngCore as _;
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(bytes)
                .into(),
        )
    }

    /// Required (distributed services): unset exits 64 naming
    /// `GRPC_AUTH_TOKEN`. Logged masked.
    pub fn read_required(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        match r.secret(GRPC_AUTH_TOKEN) {
            Some(t) => Self::new(&t).map_err(|e| ConfigError::new(GRPC_AUTH_TOKEN, e)),
            None => Err(ConfigError::new(
                GRPC_AUTH_TOKEN,
                "required: the shared token gRPC callers present (authorization: Bearer <token>)",
            )),
        }
    }

    /// Optional: `None` when unset. Logged masked.
    pub fn read_optional(r: &mut ConfigReader<'_>) -> Result<Option<Self>, ConfigError> {
        r.secret(GRPC_AUTH_TOKEN)
            .map(|t| Self::new(&t).map_err(|e| ConfigError::new(GRPC_AUTH_TOKEN, e)))
            .transpose()
    }

    /// Whether `presented` is this token, in time that does not depend on
    /// where they differ (a timing side channel would let a caller guess
    /// it byte by byte). Only the length may show; the token's length is
    /// not the secret.
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.0.as_bytes().ct_eq(presented))
    }

    /// Whether an `authorization` header value carries this token
    /// (`Bearer <token>`, the scheme case-insensitive).
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some((scheme, credential)) = split_scheme(value) else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"bearer") && self.matches(credential)
    }

    /// What a client adds to every call.
    pub fn bearer(&self) -> Bearer {
        // new() admits only visible ASCII, so this parses; a failure would
        // send no credential (and the call would be refused), never panic.
        Bearer(format!("Bearer {}", self.0).parse().ok())
    }
}

fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = value.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    let credential = rest.trim_ascii();
    (!credential.is_empty()).then_some((scheme, credential))
}

/// Adds `authorization: Bearer <token>` to every call of a client.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends no credential (a client with no token configured; the server
    /// will refuse its calls with `UNAUTHENTICATED`).
    pub fn none() -> Self {
        Self(None)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        // The caller's trace continues in the service it calls.
        for (key, value) in crate::telemetry::current_headers() {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::<Ascii>::from_bytes(key.as_bytes()),
                MetadataValue::<Ascii>::try_from(value.as_str()),
            ) {
                request.metadata_mut().insert(key, value);
            }
        }
        Ok(request)
    }
}

/// A client channel that presents the token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// `routes` as an axum router whose every request (each service's methods
/// and the unknown-method fallback) first passes the token check: without
/// the credential the answer is `UNAUTHENTICATED` and no service code runs.
pub fn authenticated(routes: tonic::service::Routes, token: &GrpcToken) -> axum::Router {
    routes
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(token.clone(), check))
}

async fn check(
    axum::extract::State(token): axum::extract::State<GrpcToken>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if token.accepts(authorization) {
        if !crate::telemetry::enabled() {
            return next.run(request).await;
        }
        // A call's span (`<package.Service>/<Method>`), continuing the
        // caller's trace from its metadata.
        let span = tracing::info_span!(
            target: crate::telemetry::TRACE,
            "grpc",
            otel.name = %request.uri().path().trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            trace_id = tracing::field::Empty,
        );
        let context: crate::bus::Headers = ["traceparent", "tracestate"]
            .into_iter()
            .filter_map(|name| {
                let value = request.headers().get(name)?.to_str().ok()?;
                Some((name.to_owned(), value.to_owned()))
            })
            .collect();
        crate::telemetry::follow(&span, &context);
        tracing::Instrument::instrument(next.run(request), span).await
    } else {
        metrics::counter!("quckchat_grpc_unauthenticated_total").increment(1);
        tonic::Status::unauthenticated(
            "missing or invalid credential (authorization: Bearer <GRPC_AUTH_TOKEN>)",
        )
        .into_http()
    }
}

/// How long a client waits to connect to another service.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client waits for an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily connecting channel to `url` (`http://host:port`) with the
/// connect and request timeouts above, presenting `token` on every call.
/// Fails only on a malformed URL (the message names it, for the variable
/// that configured it).
pub fn client(url: &str, token: &GrpcToken) -> Result<AuthChannel, String> {
    client_with_timeouts(url, token, CONNECT_TIMEOUT, REQUEST_TIMEOUT)
}

/// [`client`] with its own timeouts (a caller on a latency budget).
pub fn client_with_timeouts(
    url: &str,
    token: &GrpcToken,
    connect: Duration,
    request: Duration,
) -> Result<AuthChannel, String> {
    let channel = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("{url}: {e}"))?
        .connect_timeout(connect)
        .timeout(request)
        .connect_lazy();
    Ok(InterceptedService::new(channel, token.bearer()))
}

/// The replicas of another service, by address: `CHAT_GRPC_URL=http://a:4001,http://b:4001`.
/// A call goes to the replica that answered last; when it cannot be reached
/// or does not answer in time, the same call goes to the next one, so losing
/// one replica costs a caller one failed attempt, not its calls. (tonic's own
/// balanced channel keeps picking an endpoint it cannot connect to; a single
/// load-balanced address, such as a Kubernetes Service, works here too.)
///
/// Only calls that are safe to repeat belong here: reads, and writes that
/// are idempotent (chat's `PostMessage` with a `client_message_id`).
#[derive(Clone)]
pub struct Replicas {
    channels: Arc<[(String, AuthChannel)]>,
    /// Index of the replica that answered last.
    preferred: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.channels.iter().map(|(url, _)| url))
            .finish()
    }
}

impl Replicas {
    /// Lazily connecting channels to each of the comma-separated `urls`,
    /// presenting `token`. Fails only on a malformed or empty list.
    pub fn new(
        urls: &str,
        token: &GrpcToken,
        connect: Duration,
        request: Duration,
    ) -> Result<Self, String> {
        let channels = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|url| {
                Ok((
                    url.to_owned(),
                    client_with_timeouts(url, token, connect, request)?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if channels.is_empty() {
            return Err("no address".into());
        }
        Ok(Self {
            channels: channels.into(),
            preferred: Arc::default(),
        })
    }

    /// With the default timeouts ([`CONNECT_TIMEOUT`], [`REQUEST_TIMEOUT`]).
    pub fn with_defaults(urls: &str, token: &GrpcToken) -> Result<Self, String> {
        Self::new(urls, token, CONNECT_TIMEOUT, REQUEST_TIMEOUT)
    }

    /// Runs `call` on a channel to one replica, then on the next ones while
    /// the failure says another replica may do better.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(AuthChannel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        use std::sync::atomic::Ordering;
        let n = self.channels.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            let (url, channel) = &self.channels[at];
            match call(channel.clone()).await {
                Ok(v) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(status) if another_replica_may_answer(&status) => {
                    tracing::debug!(%url, code = ?status.code(), "replica did not answer: trying the next");
                    last = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        Err(last.unwrap_or_else(|| tonic::Status::unavailable("no replica answered")))
    }
}

/// The replica could not be reached, dropped the connection, or did not
/// answer in time — not a refusal of the request itself.
fn another_replica_may_answer(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => true,
        // Transport failures some versions report as UNKNOWN.
        tonic::Code::Unknown => status.message().contains("transport error"),
        _ => false,
    }
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
        let token = GrpcToken::generate();
        let err = client("not a url", &token).unwrap_err();
        assert!(err.starts_with("not a url: "), "{err}");
        assert!(
            client("http://127.0.0.1:1", &token).is_ok(),
            "connects lazily"
        );
    }

    const TOKEN: &str = "0123456789abcdef-token";

    #[test]
    fn the_token_compares_in_constant_time_and_exactly() {
        let token = GrpcToken::new(TOKEN).unwrap();
        assert!(token.matches(TOKEN.as_bytes()));
        assert!(!token.matches(b""));
        assert!(
            !token.matches(b"0123456789abcdef-tokeN"),
            "last byte differs"
        );
        assert!(
            !token.matches(b"X123456789abcdef-token"),
            "first byte differs"
        );
        assert!(!token.matches(b"0123456789abcdef-token-and-more"), "longer");
        assert!(!token.matches(b"0123456789abcdef-toke"), "a prefix");
    }

    #[test]
    fn only_a_bearer_header_with_the_token_is_accepted() {
        let token = GrpcToken::new(TOKEN).unwrap();
        let ok = format!("Bearer {TOKEN}");
        assert!(token.accepts(Some(ok.as_bytes())));
        assert!(token.accepts(Some(format!("bearer  {TOKEN}").as_bytes())));
        assert!(!token.accepts(None));
        assert!(!token.accepts(Some(TOKEN.as_bytes())), "no scheme");
        assert!(!token.accepts(Some(format!("Basic {TOKEN}").as_bytes())));
        assert!(!token.accepts(Some(b"Bearer wrong-token-123456")));
        assert!(!token.accepts(Some(b"Bearer ")));
    }

    #[test]
    fn weak_or_unsendable_tokens_are_refused_and_generated_ones_differ() {
        assert!(GrpcToken::new("short").is_err());
        assert!(GrpcToken::new("has a space in it here").is_err());
        assert!(GrpcToken::new("caf\u{e9}-0123456789abcdef").is_err());
        let (a, b) = (GrpcToken::generate(), GrpcToken::generate());
        assert!(a.0.len() >= MIN_TOKEN_LEN && a.0 != b.0);
        assert!(
            GrpcToken::new(&a.0).is_ok(),
            "a generated token is a valid one"
        );
        assert_eq!(format!("{a:?}"), "GrpcToken(******)");
    }

    #[test]
    fn the_token_is_read_as_a_masked_secret_and_required_when_asked() {
        use std::collections::HashMap;
        let env: HashMap<&str, &str> = HashMap::from([(GRPC_AUTH_TOKEN, TOKEN)]);
        let mut r = ConfigReader::new(&env);
        assert!(GrpcToken::read_required(&mut r)
            .unwrap()
            .matches(TOKEN.as_bytes()));
        let s = r.summary();
        assert!(
            s.contains("GRPC_AUTH_TOKEN=******") && !s.contains(TOKEN),
            "{s}"
        );

        let empty: HashMap<&str, &str> = HashMap::new();
        let err = GrpcToken::read_required(&mut ConfigReader::new(&empty)).unwrap_err();
        assert_eq!(err.key, GRPC_AUTH_TOKEN);
        assert!(GrpcToken::read_optional(&mut ConfigReader::new(&empty))
            .unwrap()
            .is_none());
        let weak: HashMap<&str, &str> = HashMap::from([(GRPC_AUTH_TOKEN, "short")]);
        assert_eq!(
            GrpcToken::read_optional(&mut ConfigReader::new(&weak))
                .unwrap_err()
                .key,
            GRPC_AUTH_TOKEN
        );
    }

    #[test]
    fn a_client_presents_the_token_as_a_bearer_header() {
        use tonic::service::Interceptor as _;
        let token = GrpcToken::new(TOKEN).unwrap();
        let request = token.bearer().call(tonic::Request::new(())).unwrap();
        let sent = request.metadata().get("authorization").unwrap();
        assert!(token.accepts(Some(sent.as_bytes())));
    }
}
