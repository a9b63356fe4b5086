//! Apple Push Notification service, HTTP/2 provider API with token
//! (`.p8` key) authentication.
//!
//! One HTTP/2 client, its connection pooled and reused for every push
//! (Apple asks providers to keep connections open rather than reconnect
//! per push). The ES256 provider token is cached and re-signed every
//! 40 minutes (Apple refuses tokens older than an hour and ones refreshed
//! more often than every 20 minutes).
//!
//! | device      | kind                         | `apns-push-type` | priority | `aps`                    |
//! |-------------|------------------------------|------------------|----------|--------------------------|
//! | `apns`      | Message, MissedCall          | `alert`          | 10       | alert, badge, sound      |
//! | `apns`      | CallEnded (or a call without text) | `background` | 5     | `content-available: 1`   |
//! | `apns`      | IncomingCall with text       | `alert`          | 10       | alert, sound             |
//! | `apns-voip` | IncomingCall, CallEnded      | `voip`           | 10       | `{}` (data beside it)    |
//!
//! An alert is never sent to a VoIP token: iOS terminates an app that
//! does not report a call for a VoIP push.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::RETRY_AFTER;
use reqwest::StatusCode;
use serde_json::{json, Map, Value};

use super::fcm::{error_chain, ProviderConfigError};
use super::{retry_after, Kind, Notification, Outcome, Provider};
use crate::devices::{Device, Platform};

/// APNS production.
pub const APNS_PRODUCTION_URL: &str = "https://api.push.apple.com";
/// APNS sandbox (development builds of the app).
pub const APNS_SANDBOX_URL: &str = "https://api.sandbox.push.apple.com";
/// How long a provider token is used before it is re-signed.
pub const PROVIDER_TOKEN_REFRESH: Duration = Duration::from_secs(40 * 60);

/// Longest `apns-collapse-id` (bytes).
pub const MAX_COLLAPSE_ID_BYTES: usize = 64;
/// Largest payload of an alert or background push (bytes).
pub const MAX_PAYLOAD_BYTES: usize = 4096;
/// Largest payload of a VoIP push (bytes).
pub const MAX_VOIP_PAYLOAD_BYTES: usize = 5120;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);

/// APNS token-based credentials and the app pushed to.
#[derive(Clone, PartialEq, Eq)]
pub struct ApnsConfig {
    /// The 10-character id of the `.p8` key.
    pub key_id: String,
    /// The Apple developer team id (the token's `iss`).
    pub team_id: String,
    /// The `.p8` key: a P-256 private key, PKCS#8 PEM.
    pub private_key: String,
    /// The app's bundle id (`apns-topic`; `<topic>.voip` for VoIP pushes).
    pub topic: String,
    /// [`APNS_PRODUCTION_URL`], [`APNS_SANDBOX_URL`], or a test server.
    pub url: String,
}

impl fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("private_key", &"<redacted>")
            .field("topic", &self.topic)
            .field("url", &self.url)
            .finish()
    }
}

impl ApnsConfig {
    /// A production config; `key_pem_or_path` as [`ApnsConfig::parse_key`].
    pub fn new(
        key_id: &str,
        team_id: &str,
        key_pem_or_path: &str,
        topic: &str,
    ) -> Result<Self, ProviderConfigError> {
        Ok(Self {
            key_id: key_id.trim().to_owned(),
            team_id: team_id.trim().to_owned(),
            private_key: Self::parse_key(key_pem_or_path)?,
            topic: topic.trim().to_owned(),
            url: APNS_PRODUCTION_URL.to_owned(),
        })
    }

    /// The `.p8` key's PEM, given inline (it contains `-----BEGIN`) or as
    /// the path of the file; checked to be a P-256 key that signs ES256.
    pub fn parse_key(pem_or_path: &str) -> Result<String, ProviderConfigError> {
        let trimmed = pem_or_path.trim();
        let (pem, what) = if trimmed.contains("-----BEGIN") {
            (normalise_pem(trimmed), "APNS key".to_owned())
        } else {
            let pem =
                std::fs::read_to_string(trimmed).map_err(|e| ProviderConfigError::Unreadable {
                    what: "APNS key",
                    path: trimmed.to_owned(),
                    detail: e.to_string(),
                })?;
            (pem, format!("APNS key file {trimmed}"))
        };
        es256_key(&pem, &what)?;
        Ok(pem)
    }
}

fn normalise_pem(pem: &str) -> String {
    if pem.contains('\n') {
        pem.to_owned()
    } else {
        pem.replace("\\n", "\n")
    }
}

/// Builds the ES256 signing key, and signs once to prove it is P-256.
fn es256_key(pem: &str, what: &str) -> Result<EncodingKey, ProviderConfigError> {
    let bad = |detail: String| ProviderConfigError::BadKey {
        what: what.to_owned(),
        detail,
    };
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| {
        bad(format!(
            "not a PKCS#8 EC private key in PEM, as Apple's .p8 files are \
             (a SEC1 key converts with `openssl pkcs8 -topk8 -nocrypt`) ({e})"
        ))
    })?;
    jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &json!({"probe": true}),
        &key,
    )
    .map_err(|e| {
        bad(format!(
            "not a P-256 key (APNS keys are ES256), cannot sign with it ({e})"
        ))
    })?;
    Ok(key)
}

struct ProviderToken {
    value: String,
    signed: Instant,
}

/// The APNS provider.
pub struct Apns {
    http: reqwest::Client,
    key: EncodingKey,
    key_id: String,
    team_id: String,
    topic: String,
    base_url: String,
    token: Mutex<Option<ProviderToken>>,
}

impl Apns {
    pub fn new(config: ApnsConfig) -> Result<Self, ProviderConfigError> {
        let key = es256_key(&config.private_key, "APNS key")?;
        for (name, value) in [
            ("key id", &config.key_id),
            ("team id", &config.team_id),
            ("topic (bundle id)", &config.topic),
        ] {
            if value.trim().is_empty() {
                return Err(ProviderConfigError::Invalid(format!(
                    "the APNS {name} is empty"
                )));
            }
        }
        if !(config.url.starts_with("https://") || config.url.starts_with("http://")) {
            return Err(ProviderConfigError::Invalid(format!(
                "the APNS URL {:?} is not an http(s) URL",
                config.url
            )));
        }
        // HTTP/2 only: ALPN `h2` over TLS, prior knowledge (h2c) over
        // plain `http://` (test servers).
        let http = reqwest::Client::builder()
            .http2_prior_knowledge()
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .http2_keep_alive_while_idle(true)
            .pool_idle_timeout(None)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ProviderConfigError::Invalid(format!("APNS HTTP client: {e}")))?;
        Ok(Self {
            http,
            key,
            key_id: config.key_id,
            team_id: config.team_id,
            topic: config.topic,
            base_url: config.url.trim_end_matches('/').to_owned(),
            token: Mutex::new(None),
        })
    }

    /// The cached provider token, or a freshly signed one.
    fn provider_token(&self) -> Result<String, Outcome> {
        let mut cached = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(token) = cached.as_ref() {
            if token.signed.elapsed() < PROVIDER_TOKEN_REFRESH {
                return Ok(token.value.clone());
            }
        }
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None;
        header.kid = Some(self.key_id.clone());
        let claims = json!({ "iss": self.team_id, "iat": chrono::Utc::now().timestamp() });
        let value =
            jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| Outcome::Failed {
                reason: format!("cannot sign the APNS provider token: {e}"),
            })?;
        *cached = Some(ProviderToken {
            value: value.clone(),
            signed: Instant::now(),
        });
        Ok(value)
    }

    /// Forgets `used` if it is still the cached token.
    fn drop_token(&self, used: &str) {
        let mut cached = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.as_ref().is_some_and(|t| t.value == used) {
            *cached = None;
        }
    }
}

/// How one push goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PushType {
    Alert,
    Background,
    Voip,
}

impl PushType {
    fn of(platform: Platform, n: &Notification) -> Result<Self, String> {
        let has_text = n.title.is_some() || n.body.is_some();
        match (platform, n.kind) {
            (Platform::ApnsVoip, Kind::IncomingCall | Kind::CallEnded) => Ok(Self::Voip),
            (Platform::ApnsVoip, kind) => Err(format!(
                "a {kind:?} push cannot go to a VoIP token (iOS requires every VoIP push to report a call)"
            )),
            (Platform::Apns, Kind::Message | Kind::MissedCall | Kind::IncomingCall) if has_text => {
                Ok(Self::Alert)
            }
            (Platform::Apns, _) => Ok(Self::Background),
            (Platform::Fcm, _) => Err("an fcm device cannot be pushed through APNS".to_owned()),
        }
    }

    fn header(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Background => "background",
            Self::Voip => "voip",
        }
    }

    fn priority(self) -> &'static str {
        match self {
            Self::Alert | Self::Voip => "10",
            Self::Background => "5",
        }
    }

    fn max_payload(self) -> usize {
        match self {
            Self::Voip => MAX_VOIP_PAYLOAD_BYTES,
            Self::Alert | Self::Background => MAX_PAYLOAD_BYTES,
        }
    }
}

/// The JSON payload: `aps` and the data keys beside it.
fn payload(push: PushType, n: &Notification) -> Value {
    let mut aps = Map::new();
    match push {
        PushType::Alert => {
            let mut alert = Map::new();
            if let Some(title) = &n.title {
                alert.insert("title".into(), json!(title));
            }
            if let Some(body) = &n.body {
                alert.insert("body".into(), json!(body));
            }
            aps.insert("alert".into(), Value::Object(alert));
            if let Some(badge) = n.badge {
                aps.insert("badge".into(), json!(badge));
            }
            aps.insert("sound".into(), json!("default"));
        }
        PushType::Background => {
            aps.insert("content-available".into(), json!(1));
            if let Some(badge) = n.badge {
                aps.insert("badge".into(), json!(badge));
            }
        }
        PushType::Voip => {}
    }
    let mut root = Map::new();
    for (key, value) in &n.data {
        if key != "aps" {
            root.insert(key.clone(), json!(value));
        }
    }
    root.insert("aps".into(), Value::Object(aps));
    Value::Object(root)
}

fn expiration(ttl: Duration) -> i64 {
    if ttl.is_zero() {
        return 0;
    }
    let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
    chrono::Utc::now().timestamp().saturating_add(secs)
}

#[async_trait]
impl Provider for Apns {
    fn name(&self) -> &'static str {
        "apns"
    }

    async fn send(&self, device: &Device, notification: &Notification) -> Outcome {
        let push = match PushType::of(device.platform, notification) {
            Ok(push) => push,
            Err(reason) => return Outcome::Failed { reason },
        };
        // APNS tokens are hex; anything else is dead (and must not reach
        // the URL path).
        if device.token.is_empty() || !device.token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Outcome::DeadToken {
                reason: "APNS token is not hexadecimal".to_owned(),
            };
        }
        let body = match serde_json::to_vec(&payload(push, notification)) {
            Ok(body) => body,
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("APNS payload: {e}"),
                }
            }
        };
        if body.len() > push.max_payload() {
            return Outcome::Failed {
                reason: format!(
                    "APNS payload of {} bytes exceeds {} bytes",
                    body.len(),
                    push.max_payload()
                ),
            };
        }
        let jwt = match self.provider_token() {
            Ok(jwt) => jwt,
            Err(outcome) => return outcome,
        };
        let topic = match push {
            PushType::Voip => format!("{}.voip", self.topic),
            PushType::Alert | PushType::Background => self.topic.clone(),
        };
        let mut request = self
            .http
            .post(format!("{}/3/device/{}", self.base_url, device.token))
            .header("authorization", format!("bearer {jwt}"))
            .header("apns-topic", topic)
            .header("apns-push-type", push.header())
            .header("apns-priority", push.priority())
            .header("apns-expiration", expiration(notification.ttl).to_string())
            .header("content-type", "application/json");
        if let Some(collapse) = notification
            .collapse_id
            .as_deref()
            .filter(|c| !c.is_empty() && c.len() <= MAX_COLLAPSE_ID_BYTES)
        {
            request = request.header("apns-collapse-id", collapse);
        }
        let response = match request.body(body).send().await {
            Ok(response) => response,
            Err(e) => {
                return Outcome::Retry {
                    after: None,
                    reason: format!("APNS unreachable: {}", error_chain(&e)),
                }
            }
        };
        let status = response.status();
        if status == StatusCode::OK {
            return Outcome::Sent;
        }
        let after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let text = response.text().await.unwrap_or_default();
        let reason_code = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_default();
        if status == StatusCode::FORBIDDEN && reason_code == "ExpiredProviderToken" {
            self.drop_token(&jwt);
        }
        classify(status, &reason_code, after)
    }
}

fn classify(status: StatusCode, reason_code: &str, after: Option<Duration>) -> Outcome {
    let reason = format!("APNS {} {reason_code}", status.as_u16())
        .trim_end()
        .to_owned();
    match (status.as_u16(), reason_code) {
        (410, _) | (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => {
            Outcome::DeadToken { reason }
        }
        (429 | 500 | 503, _) => Outcome::Retry { after, reason },
        (403, "ExpiredProviderToken") => Outcome::Retry {
            after: None,
            reason,
        },
        (s, _) if (500..600).contains(&s) => Outcome::Retry { after, reason },
        _ => Outcome::Failed { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::data;

    fn notification(kind: Kind) -> Notification {
        Notification {
            kind,
            title: Some("Ada".into()),
            body: Some("hi".into()),
            data: data([("callId", "k1"), ("aps", "ignored")]),
            collapse_id: None,
            badge: Some(2),
            ttl: Duration::from_secs(30),
        }
    }

    #[test]
    fn push_types() {
        let n = notification(Kind::Message);
        assert_eq!(PushType::of(Platform::Apns, &n), Ok(PushType::Alert));
        assert!(PushType::of(Platform::ApnsVoip, &n).is_err());
        assert!(PushType::of(Platform::Fcm, &n).is_err());
        let n = notification(Kind::CallEnded);
        assert_eq!(PushType::of(Platform::Apns, &n), Ok(PushType::Background));
        assert_eq!(PushType::of(Platform::ApnsVoip, &n), Ok(PushType::Voip));
        let mut n = notification(Kind::IncomingCall);
        assert_eq!(PushType::of(Platform::Apns, &n), Ok(PushType::Alert));
        n.title = None;
        n.body = None;
        assert_eq!(PushType::of(Platform::Apns, &n), Ok(PushType::Background));
    }

    #[test]
    fn payload_keeps_aps_its_own() {
        let body = payload(PushType::Voip, &notification(Kind::IncomingCall));
        assert_eq!(body, json!({"aps": {}, "callId": "k1"}));
    }

    #[test]
    fn classifies_apns_errors() {
        let dead = |s, r| {
            matches!(
                classify(StatusCode::from_u16(s).unwrap(), r, None),
                Outcome::DeadToken { .. }
            )
        };
        assert!(dead(410, "Unregistered"));
        assert!(dead(400, "BadDeviceToken"));
        assert!(dead(400, "DeviceTokenNotForTopic"));
        assert!(!dead(400, "BadCollapseId"));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, "InvalidProviderToken", None),
            Outcome::Failed { .. }
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, "ExpiredProviderToken", None),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, "", None),
            Outcome::Retry { .. }
        ));
    }
}
