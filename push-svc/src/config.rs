//! Push configuration: provider credentials per app, and how pushes go.
//!
//! The default app comes from the seed's variables: `FIREBASE_SERVICE_ACCOUNT`
//! (the service account JSON, inline or a file path) with
//! `FIREBASE_PROJECT_ID` (default: the account's `project_id`) for FCM;
//! `APNS_KEY_ID`, `APNS_TEAM_ID`, `APNS_PRIVATE_KEY` (PEM, inline or a
//! path), `APNS_TOPIC` (the bundle id) for APNS. More apps: `PUSH_APPS`, a
//! JSON object (inline or a path) `{"<app>": {"fcm": {"serviceAccount",
//! "projectId"?}, "apns": {"keyId", "teamId", "privateKey", "topic"}}}`.
//! Nothing configured: push is off (the registry still works).

use quckchat_runtime::config::{
    BusConfig, ConfigError, ConfigReader, ServerConfig, MONGODB_URL, REDIS_URL,
};
use quckchat_runtime::grpc::GrpcToken;
use serde::Deserialize;

use crate::queue::QueueSettings;

pub const FIREBASE_SERVICE_ACCOUNT: &str = "FIREBASE_SERVICE_ACCOUNT";
pub const FIREBASE_PROJECT_ID: &str = "FIREBASE_PROJECT_ID";
pub const FCM_API_URL: &str = "FCM_API_URL";
pub const APNS_KEY_ID: &str = "APNS_KEY_ID";
pub const APNS_TEAM_ID: &str = "APNS_TEAM_ID";
pub const APNS_PRIVATE_KEY: &str = "APNS_PRIVATE_KEY";
pub const APNS_TOPIC: &str = "APNS_TOPIC";
pub const APNS_URL: &str = "APNS_URL";
pub const PUSH_APPS: &str = "PUSH_APPS";
pub const PUSH_PREVIEW: &str = "PUSH_PREVIEW";
pub const PUSH_CONCURRENCY: &str = "PUSH_CONCURRENCY";
pub const PUSH_MAX_ATTEMPTS: &str = "PUSH_MAX_ATTEMPTS";
pub const PUSH_QUEUE_CAPACITY: &str = "PUSH_QUEUE_CAPACITY";
pub const REDIS_KEY_PREFIX: &str = "REDIS_KEY_PREFIX";
pub const CHAT_GRPC_URL: &str = "CHAT_GRPC_URL";
pub const PRESENCE_GRPC_URL: &str = "PRESENCE_GRPC_URL";

/// FCM credentials as configured (checked when the provider is built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcmCredentials {
    /// The service account JSON, or a path to it.
    pub service_account: String,
    pub project_id: Option<String>,
    pub api_url: String,
}

/// APNS credentials as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsCredentials {
    pub key_id: String,
    pub team_id: String,
    /// The `.p8` PEM, or a path to it.
    pub private_key: String,
    pub topic: String,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppCredentials {
    /// `""` for the default app.
    pub app: String,
    pub fcm: Option<FcmCredentials>,
    pub apns: Option<ApnsCredentials>,
}

/// What push needs in both modes.
#[derive(Debug, Clone)]
pub struct PushSettings {
    pub apps: Vec<AppCredentials>,
    /// Message content in alerts (default true).
    pub preview: bool,
    /// Requests in flight per provider (default 64).
    pub concurrency: usize,
    /// Provider requests per push at most (default 5).
    pub max_attempts: u32,
    pub queue: QueueSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AppJson {
    fcm: Option<FcmJson>,
    apns: Option<ApnsJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FcmJson {
    service_account: serde_json::Value,
    project_id: Option<String>,
    api_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ApnsJson {
    key_id: String,
    team_id: String,
    private_key: String,
    topic: String,
    url: Option<String>,
}

/// Inline text, or the contents of the file it names.
pub fn inline_or_file(
    key: &'static str,
    value: &str,
    inline_starts: &str,
) -> Result<String, ConfigError> {
    let trimmed = value.trim_start();
    if trimmed.starts_with(inline_starts) {
        return Ok(value.to_owned());
    }
    std::fs::read_to_string(value)
        .map_err(|e| ConfigError::new(key, format!("neither inline nor a readable file: {e}")))
}

fn app_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl PushSettings {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        let fcm_url = r.string(FCM_API_URL, "https://fcm.googleapis.com");
        let apns_url = r.string(APNS_URL, "https://api.push.apple.com");
        let mut default = AppCredentials::default();
        let project_id = r.optional(FIREBASE_PROJECT_ID);
        if let Some(account) = r.secret(FIREBASE_SERVICE_ACCOUNT) {
            default.fcm = Some(FcmCredentials {
                service_account: inline_or_file(FIREBASE_SERVICE_ACCOUNT, &account, "{")?,
                project_id,
                api_url: fcm_url.clone(),
            });
        }
        let apns = [
            (APNS_KEY_ID, r.optional(APNS_KEY_ID)),
            (APNS_TEAM_ID, r.optional(APNS_TEAM_ID)),
            (APNS_PRIVATE_KEY, r.secret(APNS_PRIVATE_KEY)),
            (APNS_TOPIC, r.optional(APNS_TOPIC)),
        ];
        match apns.iter().filter(|(_, v)| v.is_some()).count() {
            0 => {}
            4 => {
                let [key_id, team_id, private_key, topic] =
                    apns.map(|(_, v)| v.unwrap_or_default());
                default.apns = Some(ApnsCredentials {
                    key_id,
                    team_id,
                    private_key: inline_or_file(APNS_PRIVATE_KEY, &private_key, "-----BEGIN")?,
                    topic,
                    url: apns_url.clone(),
                });
            }
            _ => {
                let missing = apns
                    .iter()
                    .find(|(_, v)| v.is_none())
                    .map_or(APNS_KEY_ID, |(k, _)| *k);
                return Err(ConfigError::new(
                    missing,
                    "APNS_KEY_ID, APNS_TEAM_ID, APNS_PRIVATE_KEY and APNS_TOPIC go together",
                ));
            }
        }
        let mut apps = Vec::new();
        if default.fcm.is_some() || default.apns.is_some() {
            apps.push(default);
        }
        if let Some(more) = r.secret(PUSH_APPS) {
            let json = inline_or_file(PUSH_APPS, &more, "{")?;
            let parsed: std::collections::BTreeMap<String, AppJson> =
                serde_json::from_str(&json)
                    .map_err(|e| ConfigError::new(PUSH_APPS, format!("not the apps JSON: {e}")))?;
            for (name, app) in parsed {
                if !app_name_ok(&name) {
                    return Err(ConfigError::new(
                        PUSH_APPS,
                        format!("app name {name:?} must be 1-64 of [A-Za-z0-9._-]"),
                    ));
                }
                let fcm = match app.fcm {
                    None => None,
                    Some(f) => Some(FcmCredentials {
                        service_account: match f.service_account {
                            serde_json::Value::String(path_or_json) => {
                                inline_or_file(PUSH_APPS, &path_or_json, "{")?
                            }
                            obj @ serde_json::Value::Object(_) => obj.to_string(),
                            _ => {
                                return Err(ConfigError::new(
                                    PUSH_APPS,
                                    format!("{name}.fcm.serviceAccount must be the JSON or a path"),
                                ))
                            }
                        },
                        project_id: f.project_id,
                        api_url: f.api_url.unwrap_or_else(|| fcm_url.clone()),
                    }),
                };
                let apns = match app.apns {
                    None => None,
                    Some(a) => Some(ApnsCredentials {
                        key_id: a.key_id,
                        team_id: a.team_id,
                        private_key: inline_or_file(PUSH_APPS, &a.private_key, "-----BEGIN")?,
                        topic: a.topic,
                        url: a.url.unwrap_or_else(|| apns_url.clone()),
                    }),
                };
                apps.push(AppCredentials {
                    app: name,
                    fcm,
                    apns,
                });
            }
        }
        // Credentials that cannot push stop the start, naming the variable.
        crate::apps::build(&apps)?;
        Ok(Self {
            apps,
            preview: r.parse(PUSH_PREVIEW, true)?,
            concurrency: r.positive(PUSH_CONCURRENCY, 64usize)?,
            max_attempts: r.positive(PUSH_MAX_ATTEMPTS, 5u32)?,
            queue: QueueSettings {
                capacity: r.positive(PUSH_QUEUE_CAPACITY, 100_000usize)?,
                concurrency: 64,
            },
        })
    }
}

/// push-svc (distributed mode).
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// Admin HTTP and gRPC (default 4005).
    pub server: ServerConfig,
    pub bus: BusConfig,
    pub redis_url: String,
    pub redis_key_prefix: String,
    pub mongodb_url: String,
    pub chat_grpc_url: String,
    pub presence_grpc_url: String,
    pub settings: PushSettings,
    pub grpc_token: GrpcToken,
}

impl PushConfig {
    pub fn read(r: &mut ConfigReader<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::read(r, 4005)?,
            bus: BusConfig::read(r)?,
            redis_url: r.url(REDIS_URL, "redis://localhost:6379", &["redis", "rediss"])?,
            redis_key_prefix: r.string(REDIS_KEY_PREFIX, "qc"),
            mongodb_url: r.url(
                MONGODB_URL,
                "mongodb://localhost:27017/quckchat",
                &["mongodb", "mongodb+srv"],
            )?,
            chat_grpc_url: r.url_list(
                CHAT_GRPC_URL,
                "http://127.0.0.1:4001",
                &["http", "https"],
            )?,
            presence_grpc_url: r.url_list(
                PRESENCE_GRPC_URL,
                "http://127.0.0.1:4002",
                &["http", "https"],
            )?,
            settings: PushSettings::read(r)?,
            grpc_token: GrpcToken::read_required(r)?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use super::*;
    use crate::providers::fakes::{TEST_P256_PRIVATE_KEY_PEM, TEST_RSA_PRIVATE_KEY_PEM};

    fn read(vars: &[(&str, &str)]) -> Result<PushSettings, ConfigError> {
        let env: HashMap<&str, &str> = vars.iter().copied().collect();
        PushSettings::read(&mut ConfigReader::new(&env))
    }

    fn account(private_key: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "client_email": "push@example.iam.gserviceaccount.com",
            "private_key": private_key,
            "token_uri": "https://oauth2.example/token",
            "project_id": "p1",
        })
        .to_string()
    }

    #[test]
    fn nothing_configured_is_push_off_and_defaults_hold() {
        let s = read(&[]).unwrap();
        assert!(s.apps.is_empty());
        assert!(s.preview);
        assert_eq!(
            (s.concurrency, s.max_attempts, s.queue.capacity),
            (64, 5, 100_000)
        );
    }

    #[test]
    fn credentials_are_read_and_checked_naming_the_variable() {
        let good = account(TEST_RSA_PRIVATE_KEY_PEM);
        let s = read(&[
            (FIREBASE_SERVICE_ACCOUNT, &good),
            (APNS_KEY_ID, "K1"),
            (APNS_TEAM_ID, "T1"),
            (APNS_PRIVATE_KEY, TEST_P256_PRIVATE_KEY_PEM),
            (APNS_TOPIC, "chat.quck.app"),
            (PUSH_PREVIEW, "false"),
        ])
        .unwrap();
        assert_eq!(s.apps.len(), 1);
        assert!(s.apps[0].fcm.is_some() && s.apps[0].apns.is_some());
        assert!(!s.preview);
        let cases: [(&[(&str, &str)], &str); 5] = [
            (
                &[(FIREBASE_SERVICE_ACCOUNT, "{not json")],
                FIREBASE_SERVICE_ACCOUNT,
            ),
            (
                &[(FIREBASE_SERVICE_ACCOUNT, "/nonexistent/sa.json")],
                FIREBASE_SERVICE_ACCOUNT,
            ),
            (&[(APNS_KEY_ID, "K1")], APNS_TEAM_ID),
            (
                &[
                    (APNS_KEY_ID, "K1"),
                    (APNS_TEAM_ID, "T1"),
                    (APNS_PRIVATE_KEY, TEST_RSA_PRIVATE_KEY_PEM),
                    (APNS_TOPIC, "chat.quck.app"),
                ],
                APNS_PRIVATE_KEY,
            ),
            (
                &[(
                    PUSH_APPS,
                    r#"{"other": {"fcm": {"serviceAccount": {"type": "x"}}}}"#,
                )],
                PUSH_APPS,
            ),
        ];
        for (vars, key) in cases {
            let err = read(vars).unwrap_err().to_string();
            assert!(err.contains(key), "{vars:?}: {err}");
            assert!(!err.contains("PRIVATE KEY-----"), "no secret in {err}");
        }
    }
}
