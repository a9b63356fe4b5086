//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! Credentials are a Google service account (the JSON file the Firebase
//! console hands out). An OAuth2 access token is obtained with the
//! JWT-bearer grant (an RS256 assertion signed with the account's private
//! key, posted to its `token_uri`), cached until 5 minutes before it
//! expires, and refreshed by one caller at a time.
//!
//! Each push is one `POST {api_url}/v1/projects/{project}/messages:send`.
//! Alerts ([`Kind::Message`], [`Kind::MissedCall`]) carry a `notification`;
//! call pushes ([`Kind::IncomingCall`], [`Kind::CallEnded`]) are
//! high-priority data-only messages the app turns into its call UI.

use std::error::Error as StdError;
use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::RETRY_AFTER;
use reqwest::StatusCode;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use super::{retry_after, Kind, Notification, Outcome, Provider};
use crate::devices::{Device, Platform};

/// The FCM API's base URL.
pub const FCM_API_URL: &str = "https://fcm.googleapis.com";
/// The OAuth2 scope FCM sends need.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Google's token endpoint, for accounts whose JSON has no `token_uri`.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The JWT-bearer grant type (RFC 7523).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// An access token is refreshed this long before it expires (or halfway
/// through its life, when it lives shorter than twice this).
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// The assertion's life (Google's maximum).
const ASSERTION_LIFETIME_SECS: i64 = 3600;
/// FCM's longest `ttl`: 28 days.
const MAX_TTL_SECS: u64 = 28 * 24 * 3600;
/// Longest `apns-collapse-id` APNS accepts (bytes).
const MAX_COLLAPSE_ID_BYTES: usize = 64;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A provider's credentials or settings are unusable: the service refuses
/// to start, naming what is wrong (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderConfigError {
    /// A credentials file cannot be read.
    #[error("cannot read the {what} file {path}: {detail}")]
    Unreadable {
        what: &'static str,
        path: String,
        detail: String,
    },
    /// The service account is not a JSON object.
    #[error("the {what} is not JSON: {detail}")]
    NotJson { what: String, detail: String },
    /// A required field is missing, empty or not a string.
    #[error("the {what} has no {field:?} (or it is not a non-empty string)")]
    MissingField { what: String, field: &'static str },
    /// A private key is not of the kind the provider signs with.
    #[error("the {what} is unusable: {detail}")]
    BadKey { what: String, detail: String },
    /// Anything else (an unsupported account type, a bad URL, …).
    #[error("{0}")]
    Invalid(String),
}

/// A Google service account, as far as FCM needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub client_email: String,
    /// PKCS#8 (or PKCS#1) RSA private key, PEM.
    pub private_key: String,
    /// Where access tokens are obtained.
    pub token_uri: String,
    /// The Firebase project, when the JSON names one.
    pub project_id: Option<String>,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key", &"<redacted>")
            .field("token_uri", &self.token_uri)
            .field("project_id", &self.project_id)
            .finish()
    }
}

impl ServiceAccount {
    /// Parses a service account: inline JSON when `json_or_path` starts with
    /// `{`, otherwise the path of the JSON file. Checks that the private key
    /// is an RSA key that can sign.
    pub fn parse(json_or_path: &str) -> Result<Self, ProviderConfigError> {
        let trimmed = json_or_path.trim();
        if trimmed.starts_with('{') {
            return Self::from_json(trimmed, "service account JSON");
        }
        let text =
            std::fs::read_to_string(trimmed).map_err(|e| ProviderConfigError::Unreadable {
                what: "service account",
                path: trimmed.to_owned(),
                detail: e.to_string(),
            })?;
        Self::from_json(&text, &format!("service account file {trimmed}"))
    }

    fn from_json(text: &str, what: &str) -> Result<Self, ProviderConfigError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ProviderConfigError::NotJson {
                what: what.to_owned(),
                detail: e.to_string(),
            })?;
        let Value::Object(fields) = value else {
            return Err(ProviderConfigError::NotJson {
                what: what.to_owned(),
                detail: "expected an object".to_owned(),
            });
        };
        let string = |field: &'static str| -> Option<String> {
            match fields.get(field) {
                Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
                _ => None,
            }
        };
        let required = |field: &'static str| {
            string(field).ok_or_else(|| ProviderConfigError::MissingField {
                what: what.to_owned(),
                field,
            })
        };
        if let Some(kind) = string("type") {
            if kind != "service_account" {
                return Err(ProviderConfigError::Invalid(format!(
                    "the {what} is of type {kind:?}, not \"service_account\""
                )));
            }
        }
        let client_email = required("client_email")?;
        let private_key = normalise_pem(&required("private_key")?);
        rsa_key(&private_key, &format!("private_key of the {what}"))?;
        Ok(Self {
            client_email,
            private_key,
            token_uri: string("token_uri").unwrap_or_else(|| GOOGLE_TOKEN_URI.to_owned()),
            project_id: string("project_id"),
        })
    }
}

/// A PEM pasted into an environment variable sometimes keeps its `\n`
/// escapes: turns them back into line breaks.
fn normalise_pem(pem: &str) -> String {
    if pem.contains('\n') {
        pem.to_owned()
    } else {
        pem.replace("\\n", "\n")
    }
}

/// Builds the RS256 signing key, and signs once to prove it works.
fn rsa_key(pem: &str, what: &str) -> Result<EncodingKey, ProviderConfigError> {
    let bad = |detail: String| ProviderConfigError::BadKey {
        what: what.to_owned(),
        detail,
    };
    let key = EncodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|e| bad(format!("not an RSA private key in PEM ({e})")))?;
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &json!({"probe": true}),
        &key,
    )
    .map_err(|e| {
        bad(format!(
            "not a usable RSA private key, cannot sign RS256 with it ({e})"
        ))
    })?;
    Ok(key)
}

/// Where and as whom FCM pushes are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcmConfig {
    pub account: ServiceAccount,
    /// The Firebase project pushed through.
    pub project_id: String,
    /// [`FCM_API_URL`] but in tests.
    pub api_url: String,
}

impl FcmConfig {
    /// A config for `account`, pushing through `project_id` or else the
    /// account's own project, to the real FCM.
    pub fn new(
        account: ServiceAccount,
        project_id: Option<String>,
    ) -> Result<Self, ProviderConfigError> {
        let project_id = project_id
            .filter(|p| !p.trim().is_empty())
            .or_else(|| account.project_id.clone())
            .ok_or_else(|| {
                ProviderConfigError::Invalid(
                    "no FCM project id: the service account names none and none is configured"
                        .to_owned(),
                )
            })?;
        Ok(Self {
            account,
            project_id,
            api_url: FCM_API_URL.to_owned(),
        })
    }
}

/// A cached OAuth2 access token.
struct AccessToken {
    value: String,
    refresh_at: Instant,
}

/// The FCM HTTP v1 provider.
pub struct Fcm {
    http: reqwest::Client,
    key: EncodingKey,
    client_email: String,
    token_uri: String,
    send_url: String,
    /// Held while a token is checked or refreshed: one refresh at a time,
    /// the other senders wait for its result.
    token: Mutex<Option<AccessToken>>,
}

impl Fcm {
    pub fn new(config: FcmConfig) -> Result<Self, ProviderConfigError> {
        let key = rsa_key(&config.account.private_key, "service account private_key")?;
        for (name, url) in [
            ("FCM API URL", &config.api_url),
            ("service account token_uri", &config.account.token_uri),
        ] {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(ProviderConfigError::Invalid(format!(
                    "the {name} {url:?} is not an http(s) URL"
                )));
            }
        }
        if config.project_id.is_empty()
            || !config
                .project_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == ':')
        {
            return Err(ProviderConfigError::Invalid(format!(
                "the FCM project id {:?} is not a project id",
                config.project_id
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ProviderConfigError::Invalid(format!("FCM HTTP client: {e}")))?;
        Ok(Self {
            http,
            key,
            client_email: config.account.client_email,
            token_uri: config.account.token_uri,
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                config.api_url.trim_end_matches('/'),
                config.project_id
            ),
            token: Mutex::new(None),
        })
    }

    /// The cached access token, or a fresh one.
    async fn access_token(&self) -> Result<String, Outcome> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            if Instant::now() < token.refresh_at {
                return Ok(token.value.clone());
            }
        }
        let fresh = self.fetch_token().await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// Forgets `used` if it is still the cached token (a newer one, fetched
    /// meanwhile by another sender, is kept).
    async fn drop_token(&self, used: &str) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.value == used) {
            *cached = None;
        }
    }

    async fn fetch_token(&self) -> Result<AccessToken, Outcome> {
        let iat = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME_SECS,
        });
        let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| Outcome::Failed {
                reason: format!("cannot sign the OAuth assertion: {e}"),
            })?;
        let asked = Instant::now();
        let response = self
            .http
            .post(&self.token_uri)
            .form(&[("grant_type", JWT_BEARER_GRANT), ("assertion", &assertion)])
            .send()
            .await
            .map_err(|e| Outcome::Retry {
                after: None,
                reason: format!("OAuth token endpoint unreachable: {}", error_chain(&e)),
            })?;
        let status = response.status();
        let after = header_retry_after(&response);
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let reason = format!(
                "OAuth token request refused ({status}): {} {}",
                body["error"].as_str().unwrap_or(""),
                body["error_description"].as_str().unwrap_or("")
            )
            .trim_end()
            .to_owned();
            return Err(
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    Outcome::Retry { after, reason }
                } else {
                    Outcome::Failed { reason }
                },
            );
        }
        let Some(value) = body["access_token"].as_str().filter(|t| !t.is_empty()) else {
            return Err(Outcome::Retry {
                after: None,
                reason: "OAuth token endpoint answered without an access_token".to_owned(),
            });
        };
        let lifetime = Duration::from_secs(body["expires_in"].as_u64().unwrap_or(3600));
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        Ok(AccessToken {
            value: value.to_owned(),
            refresh_at: asked + (lifetime - margin),
        })
    }
}

#[async_trait]
impl Provider for Fcm {
    fn name(&self) -> &'static str {
        "fcm"
    }

    async fn send(&self, device: &Device, notification: &Notification) -> Outcome {
        if device.platform != Platform::Fcm {
            return Outcome::Failed {
                reason: format!(
                    "an {} device cannot be pushed through FCM",
                    device.platform.as_str()
                ),
            };
        }
        let body = message_body(&device.token, notification);
        let token = match self.access_token().await {
            Ok(token) => token,
            Err(outcome) => return outcome,
        };
        let response = match self
            .http
            .post(&self.send_url)
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(e) => {
                return Outcome::Retry {
                    after: None,
                    reason: format!("FCM unreachable: {}", error_chain(&e)),
                }
            }
        };
        let status = response.status();
        if status.is_success() {
            return Outcome::Sent;
        }
        let after = header_retry_after(&response);
        let text = response.text().await.unwrap_or_default();
        let error = FcmError::parse(&text);
        let outcome = classify(status, after, &error);
        if status == StatusCode::UNAUTHORIZED
            || (status == StatusCode::FORBIDDEN && !error.has_code("SENDER_ID_MISMATCH"))
        {
            self.drop_token(&token).await;
        }
        outcome
    }
}

/// The `{"message": …}` body of one send.
fn message_body(token: &str, n: &Notification) -> Value {
    let alert = is_alert(n);
    let call = matches!(n.kind, Kind::IncomingCall | Kind::CallEnded);
    let collapse = n.collapse_id.as_deref().filter(|c| !c.is_empty());
    let mut message = Map::new();
    message.insert("token".into(), json!(token));
    if alert {
        let mut notification = Map::new();
        if let Some(title) = &n.title {
            notification.insert("title".into(), json!(title));
        }
        if let Some(body) = &n.body {
            notification.insert("body".into(), json!(body));
        }
        message.insert("notification".into(), Value::Object(notification));
    }
    if !n.data.is_empty() {
        message.insert("data".into(), json!(n.data));
    }

    let mut android = Map::new();
    android.insert(
        "priority".into(),
        json!(if call { "high" } else { "normal" }),
    );
    android.insert(
        "ttl".into(),
        json!(format!("{}s", n.ttl.as_secs().min(MAX_TTL_SECS))),
    );
    if let Some(collapse) = collapse {
        android.insert("collapse_key".into(), json!(collapse));
        if alert {
            android.insert("notification".into(), json!({ "tag": collapse }));
        }
    }
    message.insert("android".into(), Value::Object(android));

    // iOS devices reached through Firebase.
    let mut headers = Map::new();
    headers.insert(
        "apns-priority".into(),
        json!(if alert { "10" } else { "5" }),
    );
    headers.insert(
        "apns-push-type".into(),
        json!(if alert { "alert" } else { "background" }),
    );
    headers.insert(
        "apns-expiration".into(),
        json!(expiration(n.ttl).to_string()),
    );
    if let Some(collapse) = collapse.filter(|c| c.len() <= MAX_COLLAPSE_ID_BYTES) {
        headers.insert("apns-collapse-id".into(), json!(collapse));
    }
    let mut aps = Map::new();
    if let Some(badge) = n.badge {
        aps.insert("badge".into(), json!(badge));
    }
    if alert {
        aps.insert("sound".into(), json!("default"));
    } else {
        aps.insert("content-available".into(), json!(1));
    }
    message.insert(
        "apns".into(),
        json!({ "headers": headers, "payload": { "aps": aps } }),
    );
    json!({ "message": message })
}

/// Whether `n` shows an alert (rather than being data only).
fn is_alert(n: &Notification) -> bool {
    matches!(n.kind, Kind::Message | Kind::MissedCall) && (n.title.is_some() || n.body.is_some())
}

/// Unix seconds when a push sent now with `ttl` stops being worth
/// delivering; `0` (deliver now or never) for a zero `ttl`.
fn expiration(ttl: Duration) -> i64 {
    if ttl.is_zero() {
        return 0;
    }
    let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
    chrono::Utc::now().timestamp().saturating_add(secs)
}

/// What FCM said went wrong (`{"error": {code, message, status, details}}`).
#[derive(Debug, Default)]
struct FcmError {
    status: String,
    message: String,
    /// `FcmError.errorCode`s from `details`.
    codes: Vec<String>,
    /// `BadRequest.fieldViolations[].field`s from `details`.
    fields: Vec<String>,
}

impl FcmError {
    fn parse(text: &str) -> Self {
        let value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let error = &value["error"];
        let mut parsed = Self {
            status: error["status"].as_str().unwrap_or("").to_owned(),
            message: error["message"].as_str().unwrap_or("").to_owned(),
            ..Self::default()
        };
        for detail in error["details"].as_array().into_iter().flatten() {
            if let Some(code) = detail["errorCode"].as_str() {
                parsed.codes.push(code.to_owned());
            }
            for violation in detail["fieldViolations"].as_array().into_iter().flatten() {
                if let Some(field) = violation["field"].as_str() {
                    parsed.fields.push(field.to_owned());
                }
            }
        }
        if parsed.message.is_empty() {
            parsed.message = text.chars().take(200).collect();
        }
        parsed
    }

    fn has_code(&self, code: &str) -> bool {
        self.status == code || self.codes.iter().any(|c| c == code)
    }

    /// An `INVALID_ARGUMENT` about the registration token itself.
    fn concerns_token(&self) -> bool {
        self.fields.iter().any(|f| f == "message.token")
            || self
                .message
                .to_ascii_lowercase()
                .contains("registration token")
    }

    fn describe(&self, status: StatusCode) -> String {
        let code = self
            .codes
            .first()
            .filter(|c| **c != self.status)
            .map(|c| format!(" {c}"))
            .unwrap_or_default();
        format!(
            "FCM {} {}{code}: {}",
            status.as_u16(),
            self.status,
            self.message
        )
    }
}

fn classify(status: StatusCode, after: Option<Duration>, error: &FcmError) -> Outcome {
    let reason = error.describe(status);
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Outcome::Failed { reason };
    }
    if status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || [
            "UNAVAILABLE",
            "INTERNAL",
            "QUOTA_EXCEEDED",
            "RESOURCE_EXHAUSTED",
        ]
        .iter()
        .any(|c| error.has_code(c))
    {
        return Outcome::Retry { after, reason };
    }
    if error.has_code("UNREGISTERED")
        || (error.has_code("INVALID_ARGUMENT") && error.concerns_token())
    {
        return Outcome::DeadToken { reason };
    }
    Outcome::Failed { reason }
}

fn header_retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry_after)
}

/// An error and its causes, `: `-separated (reqwest's own text rarely says
/// why a connection failed).
pub(crate) fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{data, fakes};

    fn notification(kind: Kind) -> Notification {
        Notification {
            kind,
            title: Some("Ada".into()),
            body: Some("hi".into()),
            data: data([("conversationId", "c1")]),
            collapse_id: Some("c1".into()),
            badge: Some(3),
            ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn alerts_carry_a_notification_and_calls_do_not() {
        let body = message_body("tok", &notification(Kind::Message));
        assert_eq!(body["message"]["notification"]["title"], "Ada");
        assert_eq!(body["message"]["android"]["priority"], "normal");
        assert_eq!(body["message"]["android"]["notification"]["tag"], "c1");
        let body = message_body("tok", &notification(Kind::IncomingCall));
        assert!(body["message"].get("notification").is_none());
        assert!(body["message"]["android"].get("notification").is_none());
        assert_eq!(body["message"]["android"]["priority"], "high");
        assert_eq!(body["message"]["android"]["ttl"], "60s");
    }

    fn error(text: Value) -> FcmError {
        FcmError::parse(&text.to_string())
    }

    #[test]
    fn classifies_fcm_errors() {
        let invalid_token = error(json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
            "message": "The registration token is not a valid FCM registration token",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"}]}}));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None, &invalid_token),
            Outcome::DeadToken { .. }
        ));
        let invalid_data = error(json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
            "message": "Invalid value at 'message.data[0].value' (TYPE_STRING), 12",
            "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": "message.data[0].value", "description": "…"}]}]}}));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None, &invalid_data),
            Outcome::Failed { .. }
        ));
        let quota = error(
            json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota",
            "details": [{"errorCode": "QUOTA_EXCEEDED"}]}}),
        );
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, None, &quota),
            Outcome::Retry { .. }
        ));
        let garbage = FcmError::parse("<html>bad gateway</html>");
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, None, &garbage),
            Outcome::Retry { .. }
        ));
        let mismatch = error(
            json!({"error": {"code": 403, "status": "PERMISSION_DENIED", "message": "x",
            "details": [{"errorCode": "SENDER_ID_MISMATCH"}]}}),
        );
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, None, &mismatch),
            Outcome::Failed { .. }
        ));
    }

    #[test]
    fn keys_that_are_not_rsa_pem_are_refused_clearly() {
        for bad in [
            "no pem here",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            fakes::TEST_P256_PRIVATE_KEY_PEM,
        ] {
            let err = rsa_key(bad, "the test key").err().unwrap().to_string();
            assert!(err.contains("the test key is unusable"), "{err}");
        }
        assert!(rsa_key(fakes::TEST_RSA_PRIVATE_KEY_PEM, "test key").is_ok());
    }
}
