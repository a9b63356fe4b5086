//! In-process stand-ins for the push providers, for tests: an OAuth2
//! token endpoint and FCM HTTP v1 ([`FakeFcm`]), and APNS over real
//! HTTP/2 ([`FakeApns`]), on `127.0.0.1` random ports.
//!
//! They check what the real services check, so a test passing against
//! them means the request would be accepted:
//! - the token endpoint verifies the JWT-bearer assertion's RS256
//!   signature against the service account's PUBLIC key, its `iss`, `aud`,
//!   `scope`, `iat` and `exp`, and issues access tokens with a chosen life;
//! - FCM accepts only access tokens it issued and that have not expired,
//!   and checks the body (`message.token`, string `data` values, known
//!   fields, an `android.ttl` duration);
//! - APNS speaks HTTP/2 only (h2c with prior knowledge), verifies the ES256
//!   provider token against the PUBLIC key (`kid`, `iss`, `iat` within the
//!   hour), the topic against the push type (`<bundle>.voip` for `voip`),
//!   priorities, the expiration and collapse id, and the payload.
//!
//! Accepted requests are recorded; rejected ones are logged
//! ([`FakeFcm::rejections`], [`FakeApns::rejections`]) to explain a
//! failing test. Each device token can be scripted to answer errors
//! (429 with `Retry-After`, 503, dead tokens, …) for its next attempts;
//! attempts are counted per token.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::apns::ApnsConfig;
use super::fcm::{FcmConfig, ServiceAccount, FCM_SCOPE, JWT_BEARER_GRANT};
use crate::devices::{Device, Platform};

/// The fake service account's `client_email`.
pub const TEST_CLIENT_EMAIL: &str = "push-test@quckchat-test.iam.gserviceaccount.com";
/// The fake Firebase project.
pub const TEST_PROJECT_ID: &str = "quckchat-test";
/// The fake APNS key id (`kid`).
pub const TEST_APNS_KEY_ID: &str = "TESTKEY001";
/// The fake Apple team id (`iss`).
pub const TEST_APNS_TEAM_ID: &str = "TESTTEAM01";
/// The fake app's bundle id (APNS topic).
pub const TEST_BUNDLE_ID: &str = "chat.quck.test";

/// TEST ONLY: the fake service account's RSA-2048 private key (PKCS#8), generated with `openssl genpkey` for these fakes; never a real credential.
pub const TEST_RSA_PRIVATE_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDxEorLnNyDX70C\n\
58vWTyYSy7pdk6mhUejJgCHf/XQPyJJdNVWxfuuhbLZf6yL/Q9f+fWhMOnARvjLc\n\
66r4+9uHWShN8f0Tj7XRw5rpJ9lKIJIQKlHusbhYJSxvFkALRYRCG6RFdVtqXwBy\n\
+M3BLWw7x9VOGObuldDjWETq0rEytSG+6+vvEX1dATzqjH6Ta+3lrjVXYU/xc3lA\n\
yBd3nuJk2Es6dpq6lHgIyoT11k2CkNyqYDUpMI2Fd553bwg3+XD4iJSmujh/XHKJ\n\
UQ92qzdE/NjkGUIdrSxIDuwxj/L6Mi4KkYVFv2xylifwWbgxsYinH0reSm0G/vQ8\n\
JnCcx/FzAgMBAAECggEAAJ0UdZhgwG9u4kyLqo5ePDaTY95nDEO2m4G1RBLpr1cJ\n\
MpbT4b8OTzCJzT39Tw9d5r9L5S6TL9lkfjRGz6D4xaCTQis9Vm/tOzpxABbL0A2N\n\
VWd472Mm8Sg9GfW4Dndu93trDnKs3f2r24V1PCzLI/6vXuB40nBwi1Ee2Djkks4u\n\
Q5c7inHetwSUIq3gLxQxYUI3BD+/zIEwsIhsg+qk/Y5gApzNV9Yk1995GIfl1pkp\n\
E4WyTZ+8QCfajtjAhIh734SvEW34QNULokPaPZBAwXD/dHa/QgOKis2T1xayfXqP\n\
QBCpl6JwXYUP5oVGQqNcRBPYgYFRkdQT5fqoLfm9iQKBgQD8lUZrRIWX1guZPpxN\n\
0UH76t917D0FNntkLxT4oIS+YQDM+g6kwTlXzR026SVJ+gROVQhA0GDau55DqF9u\n\
3r6VyGCXfMSwoP+GuP5YdhAuAt2tpb0eZpOcH975IXdlofIq894BbJklDYu36N+s\n\
Ta6IRT5sYrs16jQqVnQXCCCrOQKBgQD0VWd+n0HG8x+CoP80DQznutU+z6kYNlU/\n\
Kvk1rEMl3p2hmLAFEPtvLIdALPUlQryTM38lyc2IdXLNdp6d62ndJucJZJT7vA7G\n\
HTQ8XsMIx1WWEyX5OPMt/p9w50kYQcf/LBj7QGn8nv73VOCigg2HYG/7uyfUdRqC\n\
btrU1gdGCwKBgQCAoQiGkhOymle3x/HTk1CWGSuJozAEGpXGFFAKubxAM6gzutiA\n\
QMKSGyvYjezmeoN83MLiNvxMCCX18KYBEUBfiPbfzrNf++2FT2p/5EgjFmSMDQ59\n\
j+F2LajgmJF0WX+5Lg4ODZ8EBpzzoI1f8wOB9Dlw+uq57zZ3pSVjoUj5yQKBgFnA\n\
jZX71mPIp0iK73QlXxo4jWDXU1wriUD8/jJzJu9gSTM1LWOPC22ZQ82VNjALxc2k\n\
2w38hV2dFyDWdAm6klbElZXjtr6KJDsuOyP6A1bUMmJAgnB8NQguQk9tBnK8p0Ta\n\
5ApXbRd5KFueeC357BJQoJIt+8GVirljE0ufm2hlAoGAbj73vyaYoS8mME0G7otg\n\
Fa31aqa0P2FQNHyCgSSsvjRMuXooWbERXfFPDOd0bvZF/ZGylcnrv/gQ+iJWciu5\n\
lzeru2bbZQmZyQfduuqXX6W7bK95hHxqQ1+dtnMGGd2TBCg9TLQl4d7OAKYax0Fy\n\
JSrEQuD9tScZSWWfV1ukd2w=\n\
-----END PRIVATE KEY-----\n";

/// TEST ONLY: the public half of [`TEST_RSA_PRIVATE_KEY_PEM`] (the fake token endpoint verifies assertions with it).
pub const TEST_RSA_PUBLIC_KEY_PEM: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA8RKKy5zcg1+9AufL1k8m\n\
Esu6XZOpoVHoyYAh3/10D8iSXTVVsX7roWy2X+si/0PX/n1oTDpwEb4y3Ouq+Pvb\n\
h1koTfH9E4+10cOa6SfZSiCSECpR7rG4WCUsbxZAC0WEQhukRXVbal8AcvjNwS1s\n\
O8fVThjm7pXQ41hE6tKxMrUhvuvr7xF9XQE86ox+k2vt5a41V2FP8XN5QMgXd57i\n\
ZNhLOnaaupR4CMqE9dZNgpDcqmA1KTCNhXeed28IN/lw+IiUpro4f1xyiVEPdqs3\n\
RPzY5BlCHa0sSA7sMY/y+jIuCpGFRb9scpYn8Fm4MbGIpx9K3kptBv70PCZwnMfx\n\
cwIDAQAB\n\
-----END PUBLIC KEY-----\n";

/// TEST ONLY: a P-256 private key in `.p8` form (PKCS#8), the fake APNS key.
pub const TEST_P256_PRIVATE_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgaWKqrUETU3rNEdK2\n\
FDNWo3UwqjMU3zA8Dq8LFb7dbH+hRANCAASfb3t/wqbDFaA+6zzKP98YtaTQWgDJ\n\
VdlKPJ0iZmeCAihkv/4xPHQ+WPO/ga+8pSPxvbMGSdu0fjkWL5cUYson\n\
-----END PRIVATE KEY-----\n";

/// TEST ONLY: the public half of [`TEST_P256_PRIVATE_KEY_PEM`] (the fake APNS verifies provider tokens with it).
pub const TEST_P256_PUBLIC_KEY_PEM: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEn297f8KmwxWgPus8yj/fGLWk0FoA\n\
yVXZSjydImZnggIoZL/+MTx0Pljzv4GvvKUj8b2zBknbtH45Fi+XFGLKJw==\n\
-----END PUBLIC KEY-----\n";

/// TEST ONLY: a P-384 private key: a valid EC key of the wrong curve for APNS (error tests).
pub const TEST_P384_PRIVATE_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDBEeflxzbEbSZQEuDhV\n\
Z0hYgpj7xnwllR2qyesmkt5+pJrC+YLIG28FPmWsDFREMpahZANiAAQvKR2FwaUR\n\
6l0WfuJ8tsVBktE5oXmFh9vY04mQziUqxILWJGxUIy11WGbfktkWu7Jok0bTVDNB\n\
Ejqr+hBr0KWcKxeLA9iQBkHHwWtEzXZxEaOt5lQcfk6AVUVn97WRVpI=\n\
-----END PRIVATE KEY-----\n";

/// A service account JSON naming the fake token endpoint `token_uri`,
/// signed by [`TEST_RSA_PRIVATE_KEY_PEM`].
pub fn test_service_account_json(token_uri: &str) -> String {
    json!({
        "type": "service_account",
        "project_id": TEST_PROJECT_ID,
        "private_key_id": "0123456789abcdef",
        "private_key": TEST_RSA_PRIVATE_KEY_PEM,
        "client_email": TEST_CLIENT_EMAIL,
        "client_id": "100000000000000000000",
        "token_uri": token_uri,
    })
    .to_string()
}

/// A device of `user` on `platform`.
pub fn test_device(user: &str, platform: Platform, token: &str) -> Device {
    Device {
        user_id: user.to_owned(),
        platform,
        token: token.to_owned(),
        app: None,
        locale: None,
        updated_at_ms: 0,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A server task, stopped when its fake is dropped.
struct Server(JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `app` on `listener`, counting accepted connections; plain HTTP/1
/// and HTTP/2 with prior knowledge (h2c) both.
fn serve(listener: TcpListener, app: Router, connections: Arc<AtomicUsize>) -> Server {
    let listener = listener.tap_io(move |_| {
        connections.fetch_add(1, Ordering::SeqCst);
    });
    Server(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "fake provider server stopped");
        }
    }))
}

fn with_retry_after(mut response: Response, retry_after: Option<u64>) -> Response {
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
    }
    response
}

// ---------------------------------------------------------------- FCM ---

/// What the fake FCM answers a token's next attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FcmReply {
    /// 429 `RESOURCE_EXHAUSTED` / `QUOTA_EXCEEDED`.
    QuotaExceeded { retry_after: Option<u64> },
    /// 503 `UNAVAILABLE`.
    Unavailable { retry_after: Option<u64> },
    /// 500 `INTERNAL`.
    Internal,
    /// 404 `NOT_FOUND` / `UNREGISTERED`: the app was uninstalled.
    Unregistered,
    /// 400 `INVALID_ARGUMENT`: "The registration token is not a valid FCM
    /// registration token".
    InvalidToken,
    /// 401 `UNAUTHENTICATED` (as for a revoked access token).
    Unauthenticated,
    /// 403 `PERMISSION_DENIED` / `SENDER_ID_MISMATCH`.
    SenderIdMismatch,
}

/// One send FCM accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct FcmRequest {
    pub project: String,
    /// The bearer access token it carried.
    pub access_token: String,
    /// The whole JSON body (`{"message": …}`).
    pub body: Value,
    /// When the fake accepted it (wall clock, for latency figures).
    pub received_at: SystemTime,
}

impl FcmRequest {
    pub fn message(&self) -> &Value {
        &self.body["message"]
    }

    pub fn token(&self) -> &str {
        self.body["message"]["token"].as_str().unwrap_or("")
    }
}

#[derive(Default)]
struct FcmInner {
    token_lifetime_secs: u64,
    /// Access token → when it expires.
    access_tokens: HashMap<String, Instant>,
    tokens_issued: usize,
    scripts: HashMap<String, VecDeque<FcmReply>>,
    attempts: HashMap<String, usize>,
    accepted: Vec<FcmRequest>,
    rejections: Vec<String>,
}

struct FcmState {
    public_key: DecodingKey,
    token_uri: String,
    connections: Arc<AtomicUsize>,
    inner: Mutex<FcmInner>,
}

impl FcmState {
    fn reject(&self, status: StatusCode, google_status: &str, message: String) -> Response {
        lock(&self.inner)
            .rejections
            .push(format!("{} {google_status}: {message}", status.as_u16()));
        google_error(status, google_status, &message, None)
    }
}

/// A Google API error body.
fn google_error(
    status: StatusCode,
    google_status: &str,
    message: &str,
    error_code: Option<&str>,
) -> Response {
    let mut error = json!({ "code": status.as_u16(), "message": message, "status": google_status });
    if let Some(code) = error_code {
        error["details"] = json!([{
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        }]);
    }
    (status, Json(json!({ "error": error }))).into_response()
}

/// The Google OAuth2 token endpoint and FCM HTTP v1, on one port
/// (`/token` and `/v1/projects/{project}/messages:send`).
pub struct FakeFcm {
    addr: SocketAddr,
    state: Arc<FcmState>,
    _server: Server,
}

impl FakeFcm {
    /// Starts the fake; access tokens live an hour until
    /// [`FakeFcm::set_token_lifetime`].
    pub async fn start() -> std::io::Result<Self> {
        let public_key = DecodingKey::from_rsa_pem(TEST_RSA_PUBLIC_KEY_PEM.as_bytes())
            .map_err(std::io::Error::other)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(FcmState {
            public_key,
            token_uri: format!("http://{addr}/token"),
            connections: connections.clone(),
            inner: Mutex::new(FcmInner {
                token_lifetime_secs: 3600,
                ..FcmInner::default()
            }),
        });
        let app = Router::new()
            .route("/token", post(fcm_token))
            .route("/v1/projects/{project}/messages:send", post(fcm_send))
            .with_state(state.clone());
        let server = serve(listener, app, connections);
        Ok(Self {
            addr,
            state,
            _server: server,
        })
    }

    /// The OAuth2 token endpoint (`token_uri`).
    pub fn token_uri(&self) -> String {
        self.state.token_uri.clone()
    }

    /// The FCM base URL (for [`FcmConfig::api_url`]).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The service account JSON of the fake project.
    pub fn service_account_json(&self) -> String {
        test_service_account_json(&self.token_uri())
    }

    /// A config pushing to this fake as the fake service account.
    pub fn config(&self) -> FcmConfig {
        FcmConfig {
            account: ServiceAccount {
                client_email: TEST_CLIENT_EMAIL.to_owned(),
                private_key: TEST_RSA_PRIVATE_KEY_PEM.to_owned(),
                token_uri: self.token_uri(),
                project_id: Some(TEST_PROJECT_ID.to_owned()),
            },
            project_id: TEST_PROJECT_ID.to_owned(),
            api_url: self.api_url(),
        }
    }

    /// How long access tokens issued from now on live (`expires_in`).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state.inner).token_lifetime_secs = lifetime.as_secs();
    }

    /// Makes every access token issued so far invalid (FCM answers 401).
    pub fn revoke_access_tokens(&self) {
        lock(&self.state.inner).access_tokens.clear();
    }

    /// How many access tokens the token endpoint issued.
    pub fn tokens_issued(&self) -> usize {
        lock(&self.state.inner).tokens_issued
    }

    /// Answers the next attempts for `token` with `replies`, one each, then
    /// accepts again.
    pub fn script(&self, token: &str, replies: impl IntoIterator<Item = FcmReply>) {
        lock(&self.state.inner)
            .scripts
            .entry(token.to_owned())
            .or_default()
            .extend(replies);
    }

    /// Authenticated, well-formed sends to `token` (accepted or scripted).
    pub fn attempts(&self, token: &str) -> usize {
        lock(&self.state.inner)
            .attempts
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    /// The sends accepted, oldest first.
    pub fn requests(&self) -> Vec<FcmRequest> {
        lock(&self.state.inner).accepted.clone()
    }

    /// Why requests were refused (not counting scripted replies).
    pub fn rejections(&self) -> Vec<String> {
        lock(&self.state.inner).rejections.clone()
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

async fn fcm_token(
    State(state): State<Arc<FcmState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let refuse = |error: &str, description: String| {
        lock(&state.inner)
            .rejections
            .push(format!("token endpoint: {error}: {description}"));
        (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": error, "error_description": description })),
        )
            .into_response()
    };
    if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER_GRANT) {
        return refuse(
            "unsupported_grant_type",
            format!("grant_type {:?}", form.get("grant_type")),
        );
    }
    let Some(assertion) = form.get("assertion") else {
        return refuse("invalid_request", "no assertion".to_owned());
    };
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[&state.token_uri]);
    validation.set_issuer(&[TEST_CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let claims = match jsonwebtoken::decode::<Value>(assertion, &state.public_key, &validation) {
        Ok(data) => data.claims,
        Err(e) => return refuse("invalid_grant", format!("Invalid JWT: {e}")),
    };
    let scopes = claims["scope"].as_str().unwrap_or("");
    if !scopes.split(' ').any(|s| s == FCM_SCOPE) {
        return refuse(
            "invalid_scope",
            format!("scope {scopes:?} lacks {FCM_SCOPE}"),
        );
    }
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    let now = unix_now();
    if iat > now + 60 || exp <= iat || exp - iat > 3600 {
        return refuse(
            "invalid_grant",
            format!("Invalid JWT: iat {iat} / exp {exp} (now {now}, at most an hour apart)"),
        );
    }
    let mut inner = lock(&state.inner);
    inner.tokens_issued += 1;
    let token = format!("ya29.fake-{}", inner.tokens_issued);
    let lifetime = inner.token_lifetime_secs;
    inner.access_tokens.insert(
        token.clone(),
        Instant::now() + Duration::from_secs(lifetime),
    );
    Json(json!({ "access_token": token, "expires_in": lifetime, "token_type": "Bearer" }))
        .into_response()
}

async fn fcm_send(
    State(state): State<Arc<FcmState>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let valid = lock(&state.inner)
        .access_tokens
        .get(&bearer)
        .is_some_and(|expires| Instant::now() < *expires);
    if !valid {
        return state.reject(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            format!("Request had invalid authentication credentials (bearer {bearer:?})"),
        );
    }
    if project != TEST_PROJECT_ID {
        return state.reject(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!("Permission denied on project {project}"),
        );
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return state.reject(
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                format!("Invalid JSON payload received. {e}"),
            )
        }
    };
    if let Err(problem) = check_fcm_body(&body) {
        return state.reject(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", problem);
    }
    let token = body["message"]["token"].as_str().unwrap_or("").to_owned();
    let mut inner = lock(&state.inner);
    *inner.attempts.entry(token.clone()).or_default() += 1;
    let scripted = inner.scripts.get_mut(&token).and_then(VecDeque::pop_front);
    if let Some(reply) = scripted {
        drop(inner);
        return match reply {
            FcmReply::QuotaExceeded { retry_after } => with_retry_after(
                google_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RESOURCE_EXHAUSTED",
                    "Quota exceeded for sending messages to this device.",
                    Some("QUOTA_EXCEEDED"),
                ),
                retry_after,
            ),
            FcmReply::Unavailable { retry_after } => with_retry_after(
                google_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "The service is currently unavailable.",
                    Some("UNAVAILABLE"),
                ),
                retry_after,
            ),
            FcmReply::Internal => google_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                "Internal error encountered.",
                Some("INTERNAL"),
            ),
            FcmReply::Unregistered => google_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "Requested entity was not found.",
                Some("UNREGISTERED"),
            ),
            FcmReply::InvalidToken => google_error(
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                Some("INVALID_ARGUMENT"),
            ),
            FcmReply::Unauthenticated => google_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
                None,
            ),
            FcmReply::SenderIdMismatch => google_error(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "SenderId mismatch",
                Some("SENDER_ID_MISMATCH"),
            ),
        };
    }
    let id = inner.accepted.len() + 1;
    inner.accepted.push(FcmRequest {
        project: project.clone(),
        access_token: bearer,
        body,
        received_at: SystemTime::now(),
    });
    Json(json!({ "name": format!("projects/{project}/messages/{id}") })).into_response()
}

/// Unknown keys in an object (FCM refuses fields it does not know; both
/// `snake_case` and `lowerCamelCase` spellings are accepted).
fn unknown_keys(value: &Value, at: &str, known: &[&str]) -> Result<(), String> {
    let Some(object) = value.as_object() else {
        return Err(format!("Invalid value at '{at}': not an object"));
    };
    for key in object.keys() {
        let snake: String = key
            .chars()
            .flat_map(|c| {
                if c.is_ascii_uppercase() {
                    vec!['_', c.to_ascii_lowercase()]
                } else {
                    vec![c]
                }
            })
            .collect();
        if !known.contains(&snake.as_str()) {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{key}\" at '{at}': Cannot find field."
            ));
        }
    }
    Ok(())
}

fn string_map(value: &Value, at: &str) -> Result<(), String> {
    let Some(object) = value.as_object() else {
        return Err(format!("Invalid value at '{at}': not a map"));
    };
    for (i, (key, value)) in object.iter().enumerate() {
        if !value.is_string() {
            return Err(format!(
                "Invalid value at '{at}[{i}].value' (TYPE_STRING), {value} (key {key})"
            ));
        }
    }
    Ok(())
}

fn check_fcm_body(body: &Value) -> Result<(), String> {
    unknown_keys(body, "", &["message", "validate_only"])?;
    let message = &body["message"];
    unknown_keys(
        message,
        "message",
        &[
            "name",
            "data",
            "notification",
            "android",
            "webpush",
            "apns",
            "fcm_options",
            "token",
            "topic",
            "condition",
        ],
    )?;
    let targets = ["token", "topic", "condition"]
        .iter()
        .filter(|t| message.get(**t).is_some())
        .count();
    if targets != 1 {
        return Err(
            "Exactly one of message.token, message.topic or message.condition is required".into(),
        );
    }
    if message["token"].as_str().is_none_or(str::is_empty) {
        return Err("Invalid value at 'message.token': a non-empty string is required".into());
    }
    if let Some(data) = message.get("data") {
        string_map(data, "message.data")?;
    }
    if let Some(notification) = message.get("notification") {
        unknown_keys(
            notification,
            "message.notification",
            &["title", "body", "image"],
        )?;
        string_map(notification, "message.notification")?;
    }
    if let Some(android) = message.get("android") {
        unknown_keys(
            android,
            "message.android",
            &[
                "collapse_key",
                "priority",
                "ttl",
                "restricted_package_name",
                "data",
                "notification",
                "fcm_options",
                "direct_boot_ok",
                "bandwidth_constrained_ok",
                "restricted_satellite_ok",
            ],
        )?;
        if let Some(priority) = android.get("priority") {
            if !matches!(
                priority.as_str(),
                Some("normal" | "high" | "NORMAL" | "HIGH")
            ) {
                return Err(format!(
                    "Invalid value at 'message.android.priority': {priority}"
                ));
            }
        }
        if let Some(ttl) = android.get("ttl") {
            let valid = ttl
                .as_str()
                .and_then(|t| t.strip_suffix('s'))
                .is_some_and(|secs| {
                    let (whole, fraction) = secs.split_once('.').unwrap_or((secs, "0"));
                    !whole.is_empty()
                        && whole.bytes().all(|b| b.is_ascii_digit())
                        && fraction.len() <= 9
                        && fraction.bytes().all(|b| b.is_ascii_digit())
                });
            if !valid {
                return Err(format!("Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), {ttl}"));
            }
        }
        if let Some(data) = android.get("data") {
            string_map(data, "message.android.data")?;
        }
        if let Some(notification) = android.get("notification") {
            if !notification.is_object() {
                return Err("Invalid value at 'message.android.notification'".into());
            }
        }
    }
    if let Some(apns) = message.get("apns") {
        unknown_keys(
            apns,
            "message.apns",
            &["headers", "payload", "fcm_options", "live_activity_token"],
        )?;
        if let Some(headers) = apns.get("headers") {
            string_map(headers, "message.apns.headers")?;
        }
        if let Some(payload) = apns.get("payload") {
            if !payload["aps"].is_object() {
                return Err("Invalid value at 'message.apns.payload': no aps dictionary".into());
            }
        }
    }
    Ok(())
}

// --------------------------------------------------------------- APNS ---

/// What the fake APNS answers a device token's next attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApnsReply {
    /// 429 `TooManyRequests`.
    TooManyRequests { retry_after: Option<u64> },
    /// 503 `ServiceUnavailable`.
    ServiceUnavailable { retry_after: Option<u64> },
    /// 500 `InternalServerError`.
    InternalServerError,
    /// 410 `Unregistered`: the app was uninstalled.
    Unregistered,
    /// 400 `BadDeviceToken`.
    BadDeviceToken,
    /// 400 `DeviceTokenNotForTopic`.
    DeviceTokenNotForTopic,
    /// 403 `ExpiredProviderToken`.
    ExpiredProviderToken,
    /// Any status and `reason`.
    Reason { status: u16, reason: String },
}

/// One push APNS accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct ApnsRequest {
    pub device_token: String,
    /// Request headers, lower-case names (`authorization` included).
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    /// Whether it came over HTTP/2.
    pub http2: bool,
    /// When the fake accepted it (wall clock, for latency figures).
    pub received_at: SystemTime,
}

impl ApnsRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct ApnsInner {
    scripts: HashMap<String, VecDeque<ApnsReply>>,
    attempts: HashMap<String, usize>,
    accepted: Vec<ApnsRequest>,
    rejections: Vec<String>,
    provider_tokens: HashSet<String>,
}

struct ApnsState {
    public_key: DecodingKey,
    connections: Arc<AtomicUsize>,
    inner: Mutex<ApnsInner>,
}

impl ApnsState {
    fn reject(&self, status: StatusCode, reason: &str, why: String) -> Response {
        lock(&self.inner)
            .rejections
            .push(format!("{} {reason}: {why}", status.as_u16()));
        apns_error(status.as_u16(), reason)
    }
}

fn apns_error(status: u16, reason: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut body = json!({ "reason": reason });
    if status == StatusCode::GONE {
        body["timestamp"] = json!(chrono::Utc::now().timestamp_millis());
    }
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(
        "apns-id",
        HeaderValue::from_static("00000000-0000-0000-0000-000000000000"),
    );
    response
}

/// APNS (`POST /3/device/{token}` over HTTP/2) for the app
/// [`TEST_BUNDLE_ID`], key [`TEST_APNS_KEY_ID`] of team
/// [`TEST_APNS_TEAM_ID`].
pub struct FakeApns {
    addr: SocketAddr,
    state: Arc<ApnsState>,
    _server: Server,
}

impl FakeApns {
    pub async fn start() -> std::io::Result<Self> {
        let public_key = DecodingKey::from_ec_pem(TEST_P256_PUBLIC_KEY_PEM.as_bytes())
            .map_err(std::io::Error::other)?;
        let connections = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(ApnsState {
            public_key,
            connections: connections.clone(),
            inner: Mutex::new(ApnsInner::default()),
        });
        let app = Router::new()
            .route("/3/device/{token}", post(apns_push))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = serve(listener, app, connections);
        Ok(Self {
            addr,
            state,
            _server: server,
        })
    }

    /// The base URL (`http://`: h2c).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A config pushing to this fake with the test key.
    pub fn config(&self) -> ApnsConfig {
        ApnsConfig {
            key_id: TEST_APNS_KEY_ID.to_owned(),
            team_id: TEST_APNS_TEAM_ID.to_owned(),
            private_key: TEST_P256_PRIVATE_KEY_PEM.to_owned(),
            topic: TEST_BUNDLE_ID.to_owned(),
            url: self.url(),
        }
    }

    /// Answers the next attempts for `token` with `replies`, one each, then
    /// accepts again.
    pub fn script(&self, token: &str, replies: impl IntoIterator<Item = ApnsReply>) {
        lock(&self.state.inner)
            .scripts
            .entry(token.to_owned())
            .or_default()
            .extend(replies);
    }

    /// Authenticated, well-formed pushes to `token` (accepted or scripted).
    pub fn attempts(&self, token: &str) -> usize {
        lock(&self.state.inner)
            .attempts
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    /// The pushes accepted, oldest first.
    pub fn requests(&self) -> Vec<ApnsRequest> {
        lock(&self.state.inner).accepted.clone()
    }

    /// Why requests were refused (not counting scripted replies).
    pub fn rejections(&self) -> Vec<String> {
        lock(&self.state.inner).rejections.clone()
    }

    /// Distinct valid provider tokens seen.
    pub fn provider_tokens(&self) -> usize {
        lock(&self.state.inner).provider_tokens.len()
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

async fn apns_push(
    State(state): State<Arc<ApnsState>>,
    Path(token): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bad = StatusCode::BAD_REQUEST;
    if version != Version::HTTP_2 {
        return state.reject(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "BadProtocol",
            format!("{version:?}: APNS speaks HTTP/2 only"),
        );
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());

    // The provider token.
    let Some(jwt) = header("authorization").and_then(|v| v.strip_prefix("bearer ")) else {
        return state.reject(
            StatusCode::FORBIDDEN,
            "MissingProviderToken",
            "no `authorization: bearer`".into(),
        );
    };
    let jwt_header = match jsonwebtoken::decode_header(jwt) {
        Ok(h) => h,
        Err(e) => {
            return state.reject(StatusCode::FORBIDDEN, "InvalidProviderToken", e.to_string())
        }
    };
    if jwt_header.alg != Algorithm::ES256 || jwt_header.kid.as_deref() != Some(TEST_APNS_KEY_ID) {
        return state.reject(
            StatusCode::FORBIDDEN,
            "InvalidProviderToken",
            format!("alg {:?}, kid {:?}", jwt_header.alg, jwt_header.kid),
        );
    }
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["iss"]);
    validation.set_issuer(&[TEST_APNS_TEAM_ID]);
    let claims = match jsonwebtoken::decode::<Value>(jwt, &state.public_key, &validation) {
        Ok(data) => data.claims,
        Err(e) => {
            return state.reject(StatusCode::FORBIDDEN, "InvalidProviderToken", e.to_string())
        }
    };
    let Some(iat) = claims["iat"].as_i64() else {
        return state.reject(
            StatusCode::FORBIDDEN,
            "InvalidProviderToken",
            "no iat".into(),
        );
    };
    let now = unix_now();
    if iat > now + 60 {
        return state.reject(
            StatusCode::FORBIDDEN,
            "InvalidProviderToken",
            format!("iat {iat} is in the future"),
        );
    }
    if now - iat > 3600 {
        return state.reject(
            StatusCode::FORBIDDEN,
            "ExpiredProviderToken",
            format!("iat {iat} is over an hour old"),
        );
    }
    lock(&state.inner).provider_tokens.insert(jwt.to_owned());

    // The device token and the headers.
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return state.reject(
            bad,
            "BadDeviceToken",
            format!("{token:?} is not hexadecimal"),
        );
    }
    let push_type = header("apns-push-type").unwrap_or("");
    if !matches!(
        push_type,
        "alert"
            | "background"
            | "voip"
            | "location"
            | "complication"
            | "fileprovider"
            | "mdm"
            | "liveactivity"
            | "pushtotalk"
    ) {
        return state.reject(
            bad,
            "InvalidPushType",
            format!("apns-push-type {push_type:?}"),
        );
    }
    let Some(topic) = header("apns-topic") else {
        return state.reject(bad, "MissingTopic", "no apns-topic".into());
    };
    let expected_topic = if push_type == "voip" {
        format!("{TEST_BUNDLE_ID}.voip")
    } else {
        TEST_BUNDLE_ID.to_owned()
    };
    if topic != expected_topic {
        return state.reject(
            bad,
            "TopicDisallowed",
            format!("apns-topic {topic:?} for a {push_type} push (expected {expected_topic:?})"),
        );
    }
    let priority = header("apns-priority").unwrap_or("10");
    if !matches!(priority, "10" | "5" | "1") || (push_type == "background" && priority == "10") {
        return state.reject(
            bad,
            "BadPriority",
            format!("apns-priority {priority} for a {push_type} push"),
        );
    }
    if let Some(expiration) = header("apns-expiration") {
        if expiration.parse::<u64>().is_err() {
            return state.reject(
                bad,
                "BadExpirationDate",
                format!("apns-expiration {expiration:?}"),
            );
        }
    }
    if header("apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return state.reject(
            bad,
            "BadCollapseId",
            "apns-collapse-id over 64 bytes".into(),
        );
    }

    // The payload.
    let limit = if push_type == "voip" { 5120 } else { 4096 };
    if body.is_empty() {
        return state.reject(bad, "PayloadEmpty", "empty body".into());
    }
    if body.len() > limit {
        return state.reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!("{} bytes", body.len()),
        );
    }
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(payload) => payload,
        Err(e) => return state.reject(bad, "BadPayload", e.to_string()),
    };
    let Some(aps) = payload["aps"].as_object() else {
        return state.reject(bad, "BadPayload", "no aps dictionary".into());
    };
    let problem = match push_type {
        "alert" if !aps.contains_key("alert") => Some("an alert push without aps.alert"),
        "background" if aps.get("content-available") != Some(&json!(1)) => {
            Some("a background push without aps.content-available = 1")
        }
        "background" if aps.contains_key("alert") || aps.contains_key("sound") => {
            Some("a background push with an alert or sound")
        }
        _ => None,
    };
    if let Some(problem) = problem {
        return state.reject(bad, "BadPayload", problem.to_owned());
    }

    let mut inner = lock(&state.inner);
    *inner.attempts.entry(token.clone()).or_default() += 1;
    if let Some(reply) = inner.scripts.get_mut(&token).and_then(VecDeque::pop_front) {
        drop(inner);
        return match reply {
            ApnsReply::TooManyRequests { retry_after } => {
                with_retry_after(apns_error(429, "TooManyRequests"), retry_after)
            }
            ApnsReply::ServiceUnavailable { retry_after } => {
                with_retry_after(apns_error(503, "ServiceUnavailable"), retry_after)
            }
            ApnsReply::InternalServerError => apns_error(500, "InternalServerError"),
            ApnsReply::Unregistered => apns_error(410, "Unregistered"),
            ApnsReply::BadDeviceToken => apns_error(400, "BadDeviceToken"),
            ApnsReply::DeviceTokenNotForTopic => apns_error(400, "DeviceTokenNotForTopic"),
            ApnsReply::ExpiredProviderToken => apns_error(403, "ExpiredProviderToken"),
            ApnsReply::Reason { status, reason } => apns_error(status, &reason),
        };
    }
    inner.accepted.push(ApnsRequest {
        device_token: token,
        headers: headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect(),
        body: payload,
        http2: true,
        received_at: SystemTime::now(),
    });
    let mut response = StatusCode::OK.into_response();
    response.headers_mut().insert(
        "apns-id",
        HeaderValue::from_static("00000000-0000-0000-0000-000000000001"),
    );
    response
}
